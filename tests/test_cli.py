"Black-box tests of the `lora-kit` console script, run as a user runs it."
import json, subprocess, sys

import pytest


def lora_kit(*args):
    return subprocess.run([sys.executable, "-m", "lora_kit.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand():
    r = lora_kit("--help")
    assert r.returncode == 0
    for sub in ("estimate", "finetune", "generate", "merge", "bench", "app"): assert sub in r.stdout


def test_estimate_json_matches_closed_form():
    r = lora_kit("estimate", "--model", "llama-2-13b", "--rank", "16", "--json")
    assert r.returncode == 0, r.stderr
    est = json.loads(r.stdout)
    # 40 layers x (q_proj + v_proj), each 5120 -> 5120: r * (in + out) per layer
    assert est["trainable_params"] == 40 * 2 * 16 * (5120 + 5120)
    # LLaMA-2-13B: 13,015,864,320 parameters (embeddings, 40 blocks, norm, lm_head)
    assert est["total_params"] - est["trainable_params"] == 13_015_864_320


@pytest.mark.parametrize("args, reason", [
    (("estimate", "--rank", "0"), "--rank must be >= 1"),
    (("estimate", "--model", "llama-3"), "invalid choice"),
    (("estimate", "--rank", "eight"), "invalid int value"),
    (("finetune",), "not implemented yet"),
    (("frobnicate",), "invalid choice"),
])
def test_bad_input_exits_2_with_one_line(args, reason):
    r = lora_kit(*args)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and reason in r.stderr and "Traceback" not in r.stderr
