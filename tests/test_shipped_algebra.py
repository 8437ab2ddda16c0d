"""configs/algebra.py as shipped, with full fine-tuning and with LoRA (`--config.model.lora.rank=4`), on
the tiny algebra model (tests/shipped_runs.py): a module of its own so that the suite's two workers
share the shipped configs' runs."""
import pytest

from tests.shipped_runs import ALGEBRA_LORA, check_paper_run, full_tier, wrapper  # noqa: F401 (a fixture)


@full_tier
@pytest.mark.parametrize("flags", [pytest.param([], id="algebra"), pytest.param(ALGEBRA_LORA, id="algebra_lora4")])
def test_algebra_runs_resumes_and_exports_as_shipped(flags, wrapper, tmp_path):  # noqa: F811
    """configs/algebra.py for STEPS steps (checkpointed at the last), resumed for one more, its export
    scored by `python -m sqlm_jax.evaluate` as the run's last evaluation scored the policy."""
    check_paper_run("algebra", flags, wrapper, tmp_path)
