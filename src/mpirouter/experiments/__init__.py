"""Layer 4, experiments on top of the trainer: router comparisons over seeds (`compare`) and their
reports (`report`, `stats`, `plots`), the demo (`demo`), speed benchmarks (`bench`) and checkpoint
inspection (`inspection`). Each is a CLI command; import the module you need."""
