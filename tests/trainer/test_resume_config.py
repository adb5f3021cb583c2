"""TrainConfig checks made when a run resumes."""

import pytest

from mpirouter.common.config import to_dict
from mpirouter.trainer.config import TrainConfig, check_resume_config


def test_a_global_batch_that_this_job_cannot_split_says_so():
    """Issue #22 row 21: 3 processes resuming a global batch of 32 were told "set batch_size=?"."""
    saved = to_dict(TrainConfig(batch_size=16))
    with pytest.raises(ValueError, match=r"global batch of 32 sequences .* is not divisible by 3; resume with a number of "
                                         r"processes that divides 32 \(1, 2, 4, 8, 16, 32\)"):
        check_resume_config(saved, TrainConfig(batch_size=11), saved_world=2, world=3)


def test_a_divisible_global_batch_names_the_batch_size_to_set():
    saved = to_dict(TrainConfig(batch_size=16))
    with pytest.raises(ValueError, match="set batch_size=8"):
        check_resume_config(saved, TrainConfig(batch_size=16), saved_world=2, world=4)
    check_resume_config(saved, TrainConfig(batch_size=8), saved_world=2, world=4)  # the same global batch: fine
