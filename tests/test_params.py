"""Parameter accounting (abstract: nothing is allocated): GRIN-MoE 41.873B total / 6.641B active per token."""

import importlib.util
import os
import subprocess
import sys

import pytest

from grin_jax.models import model_config_from
from grin_jax.params import count_params, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return model_config_from(module.get_config(arg).model)


def test_grin_moe_counts_match_the_paper():
    """GRIN tech report (docs/architecture.md): 41.873B parameters, 6.641B active per token (embedding and untied head
    with bias included). Counting 42B parameters in float32 would need 167 GB: this proves nothing is allocated."""
    counts = count_params(_config("grin_moe_16x3_8b"))
    assert counts["total"] == 41_873_153_344
    assert counts["active"] == 6_640_999_744
    assert round(counts["total"] / 1e9, 3) == 41.873
    assert round(counts["active"] / 1e9, 3) == 6.641
    assert counts["experts"] == 32 * 16 * 3 * 4096 * 6400
    assert counts["lm_head"] == 32064 * 4096 + 32064


def test_mixtral_8x7b_counts():
    counts = count_params(_config("mixtral_8x7b"))
    assert counts["total"] == 46_702_792_704   # 46.7B
    assert counts["active"] == 12_879_925_248  # 12.9B


def test_dense_variant_has_the_active_parameters_minus_routers():
    moe, dense = count_params(_config("grin_moe_16x3_8b")), count_params(_config("grin_moe_16x3_8b", "dense"))
    assert dense["total"] == dense["active"]
    assert moe["active"] - dense["active"] == 32 * 4096 * 16  # the routers


def test_cli_prints_total_and_active(capsys):
    assert main(["params", "--config=" + os.path.join(REPO, "configs", "grin_moe_16x3_8b.py")]) == 0
    out = capsys.readouterr().out
    assert "total parameters: 41.873B   active per token: 6.641B" in out
    assert "41,873,153,344" in out and "6,640,999,744" in out


def test_cli_as_a_module_with_variant_and_override():
    result = subprocess.run(
        [sys.executable, "-m", "grin_jax.params", "--config=configs/mixtral_8x7b.py:bf16",
         "--config.model.num_layers=16"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "16 layers" in result.stdout


@pytest.mark.parametrize("arg", ["nonsense"])
def test_unknown_variant_is_an_error(arg):
    with pytest.raises(ValueError, match="unknown variant"):
        _config("grin_moe_16x3_8b", arg)
