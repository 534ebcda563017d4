"""The study's comparison (`lora_kit.study`): FLOPs of a 4-bit base counted as the matmuls they are, the runs file a long
comparison continues from, the learning rate it keeps, and bad input refused before any work."""
import json
from dataclasses import replace

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from lora_kit.core import ConfigError
from lora_kit.efficient import count_flops
from lora_kit.finetune import DEMO_CONFIG
from lora_kit.study import chosen_runs, main, study_quality


def test_count_flops_counts_bitsandbytes_4bit_matmul_like_the_fp32_one():
    torch.manual_seed(0)
    dense = nn.Linear(128, 192, bias=False)
    quantized = bnb.nn.Linear4bit(128, 192, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    quantized.load_state_dict(dense.state_dict())
    quantized = quantized.to("cpu")  # quantizes the weight
    x = torch.randn(3, 5, 128)
    flops = {name: count_flops(lambda layer=layer: layer(x)) for name, layer in (("dense", dense), ("4-bit", quantized))}
    assert flops == {"dense": 2 * 3 * 5 * 128 * 192, "4-bit": 2 * 3 * 5 * 128 * 192}  # closed form: 2·N·in·out


def row(method, seed, lr, loss):
    return dict(method=method, seed=seed, lr=lr, eval_loss=loss, exact_match=0.0)


def test_chosen_runs_keep_the_learning_rate_whose_first_seed_reached_the_lowest_loss():
    runs = [row("full", 0, 1e-3, 0.5), row("full", 0, 3e-3, 0.4), row("full", 0, 3e-4, 0.9), row("full", 1, 3e-3, 0.45),
            row("LoRA", 0, 5e-3, 0.3)]
    chosen = chosen_runs(runs)
    assert [(r["seed"], r["lr"]) for r in chosen["full"]] == [(0, 3e-3), (1, 3e-3)]
    assert [r["lr"] for r in chosen["LoRA"]] == [5e-3]


def test_a_second_call_with_the_same_runs_file_runs_only_what_is_missing(tmp_path):
    runs_file, short = tmp_path / "runs.json", replace(DEMO_CONFIG, max_steps=2)
    first = study_quality(("LoRA",), seeds=(0,), config=short, eval_examples=2, json_path=runs_file)
    first[0]["marker"] = "kept"  # a run read back from the file, not run again, keeps what the file holds
    runs_file.write_text(json.dumps(first))
    both = study_quality(("LoRA",), seeds=(0, 1), config=short, eval_examples=2, json_path=runs_file)
    assert [r["seed"] for r in both] == [0, 1] and both[0]["marker"] == "kept" and "marker" not in both[1]
    assert json.loads(runs_file.read_text()) == both


def test_unknown_method_is_refused_before_any_run():
    with pytest.raises(ConfigError, match="Unknown method.*full, LoRA, QLoRA, DoRA"):
        study_quality(("LoRA", "IA3"))


@pytest.mark.parametrize("args", [["--seeds", "0,x"], ["--steps", "0"], ["--eval-examples", "0"]])
def test_bad_command_line_values_stop_with_a_usage_error(args, capsys):
    with pytest.raises(SystemExit) as e: main(args)
    assert e.value.code == 2 and args[0] in capsys.readouterr().err
