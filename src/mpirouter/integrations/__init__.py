"""Layer 3, MPI routers inside other libraries' models (depends on `core` and `common`, never on the
trainer): `hf` for Hugging Face transformers MoE models. `mpirouter.hf` is the same module."""
