"""`mpirouter.hf`: the Hugging Face transformers integration, under the name the README uses.

    from mpirouter.hf import apply_mpi, export, last_aux_loss

The code lives in `mpirouter.integrations.hf` (split by concern); this module is that package
under its short name (one object, so attributes set on either are seen by both).
"""

import sys

from .integrations import hf as _hf

sys.modules[__name__] = _hf
