"""Truncation that keeps what is learned (issue 26): an example longer than `max_length` loses the end of its user
message before any reply token and keeps the template's closing text right before its reply; it is dropped only when
no reply token is left. Cuts and drops are counted in one warning and in metrics.json, and a split with nothing left
stops `lora-kit finetune` with exit 2 and one line that names --max-length.

Every expected token comes from the tokenizer itself (the tiny base's, whatever its vocabulary): the reply tokenized
on its own, the prompt written out by hand; long texts are grown until the tokenizer says they are long enough."""
import json, re, subprocess, sys, warnings

import pytest
from transformers import AutoTokenizer

from lora_kit.data import ALPACA_PREAMBLE, DataError, load_instructions, tokenize_dataset, tokenize_messages
from lora_kit.tiny import base_path
from conftest import SUBPROCESS_ENV

INSTRUCTION, SENTENCE, REPLY = "Translate to Indonesian:", "the cat eats the fish.", "kucing itu makan ikan itu."
SYSTEM = "You are a careful translator. Answer with the Indonesian sentence only."
MAX_LENGTH = 96


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(base_path())


def ids(tok, text): return tok(text, add_special_tokens=False)["input_ids"]


def longer_than(tok, n, unit):
    "`unit` repeated until it is more than `n` tokens, however the tokenizer merges."
    text = unit
    while len(ids(tok, text)) <= n: text += " " + unit
    return text


def reply_tokens(example): return [i for i, l in zip(example["input_ids"], example["labels"]) if l != -100]


def rows(tok, short=0, long=0, briefed=0):
    "Alpaca rows: `short` ones fit `MAX_LENGTH`, `long` ones have a message 4 times over it, `briefed` ones a system prompt over it."
    short_row = {"instruction": INSTRUCTION, "input": SENTENCE, "output": REPLY}
    assert len(ids(tok, f"<s>[INST] {INSTRUCTION}\n\n{SENTENCE} [/INST] {REPLY} </s>")) <= MAX_LENGTH
    long_row = {**short_row, "input": longer_than(tok, 4 * MAX_LENGTH, SENTENCE)}
    briefed_row = {**short_row, "system": longer_than(tok, MAX_LENGTH, SYSTEM)}
    return [short_row] * short + [long_row] * long + [briefed_row] * briefed


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("template, opening, closing, reply", [
    ("llama2", "<s>[INST] ", " [/INST]", f" {REPLY} </s>"),
    ("alpaca", f"<s>{ALPACA_PREAMBLE}\n\n### Instruction:\n", "\n\n### Response:\n", f"{REPLY}</s>"),
    ("plain", "<s>", "\n", f"{REPLY}</s>"),
])
def test_a_long_prompt_is_cut_and_the_reply_kept_whole(tok, template, opening, closing, reply):
    user = f"{INSTRUCTION}\n\n{longer_than(tok, 1000, SENTENCE)}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": REPLY}]
    prompt_ids, reply_ids, closing_ids = ids(tok, opening + user + closing), ids(tok, reply), ids(tok, closing)
    assert prompt_ids[-len(closing_ids):] == closing_ids  # the closing is its own tokens, so it can be checked below
    max_length = len(ids(tok, opening)) + len(closing_ids) + len(reply_ids) + 40  # room for some 40 tokens of the message
    example = tokenize_messages(messages, tok, template, max_length)
    assert example["truncated"] and len(example["input_ids"]) == max_length
    n_prompt = max_length - len(reply_ids)
    assert example["labels"] == [-100] * n_prompt + reply_ids  # the whole reply carries the loss, nothing else does
    assert example["input_ids"][n_prompt:] == reply_ids
    kept = example["input_ids"][:n_prompt]
    assert kept[-len(closing_ids):] == closing_ids  # the template's closing, right before the reply
    assert kept[:-len(closing_ids)] == prompt_ids[:n_prompt - len(closing_ids)]  # the start of the prompt, in order
    assert len(kept) > len(ids(tok, opening)) + len(closing_ids)  # some of the message is kept


def test_the_reply_is_cut_only_when_it_alone_does_not_fit(tok):
    user, long_reply = longer_than(tok, 200, SENTENCE), longer_than(tok, 200, REPLY)
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": long_reply}]
    prompt_ids, closing_ids = ids(tok, f"<s>[INST] {user} [/INST]"), ids(tok, " [/INST]")
    example = tokenize_messages(messages, tok, "llama2", MAX_LENGTH)
    reply = reply_tokens(example)
    assert len(example["input_ids"]) == MAX_LENGTH and reply == ids(tok, f" {long_reply} </s>")[:len(reply)]  # its start
    kept = example["input_ids"][:MAX_LENGTH - len(reply)]
    assert kept[-len(closing_ids):] == closing_ids and kept[:-len(closing_ids)] == prompt_ids[:len(kept) - len(closing_ids)]
    # the message is gone (a token that shares a character with the template's text stays with it), the template stays
    assert len(kept) <= len(ids(tok, "<s>[INST] ")) + len(closing_ids) + 1


def test_whole_exchanges_first_then_the_one_that_does_not_fit(tok):
    messages = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi."},
                {"role": "user", "content": longer_than(tok, 400, SENTENCE)}, {"role": "assistant", "content": REPLY},
                {"role": "user", "content": "Again."}, {"role": "assistant", "content": "hi again."}]
    first = ids(tok, "<s>[INST] Say hi. [/INST] hi. </s>")
    example = tokenize_messages(messages, tok, "llama2", len(first) + 60)
    assert example["input_ids"][:len(first)] == first and len(example["input_ids"]) == len(first) + 60
    assert example["input_ids"][-len(ids(tok, f" {REPLY} </s>")):] == ids(tok, f" {REPLY} </s>")  # ends on the 2nd reply
    assert reply_tokens(example) == ids(tok, " hi. </s>") + ids(tok, f" {REPLY} </s>")  # the third exchange is gone


def test_cut_and_dropped_examples_are_counted_in_one_warning(tok, tmp_path):
    ds = load_instructions(write(tmp_path / "mixed.jsonl", rows(tok, short=5, long=3, briefed=2)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tokenize_dataset(ds, tok, max_length=MAX_LENGTH)
    assert [str(w.message) for w in caught if "max_length" in str(w.message)] == [
        f"5 of 10 train examples were longer than max_length={MAX_LENGTH}: 3 kept with their prompt cut, 2 dropped "
        "(no response token left); raise max_length (--max-length) to keep them whole"]
    assert len(out) == 8 and out["truncated"] == [False] * 5 + [True] * 3
    assert all(reply_tokens(example) == ids(tok, f" {REPLY} </s>") for example in out)


def test_nothing_left_is_a_data_error_whose_suggested_length_works(tok, tmp_path):
    ds = load_instructions(write(tmp_path / "briefed.jsonl", rows(tok, briefed=3)))
    with pytest.raises(DataError) as e: tokenize_dataset(ds, tok, max_length=MAX_LENGTH, name="eval")
    message = str(e.value)
    system, user = ds[0]["messages"][0]["content"], ds[0]["messages"][1]["content"]
    longest = len(ids(tok, f"<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"))
    assert message.startswith(f"every eval example's prompt fills max_length={MAX_LENGTH}"), message
    assert f"longest prompt {longest} tokens" in message and "shorten the system prompt" in message
    need = int(re.search(r"raise max_length \(--max-length\) to at least (\d+)", message).group(1))
    reply = ids(tok, f" {REPLY} </s>")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cut messages are counted; that warning is tested above
        assert [reply_tokens(example) for example in tokenize_dataset(ds, tok, max_length=need)] == [reply] * 3
        assert [reply_tokens(example) for example in tokenize_dataset(ds, tok, max_length=need - 1)] == [reply[:-1]] * 3


def lora_kit(*args):
    return subprocess.run([sys.executable, "-m", "lora_kit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=SUBPROCESS_ENV)


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.slow
def test_cli_exits_2_with_one_line_when_a_split_has_nothing_left(tok, tmp_path, split):
    briefed, short = write(tmp_path / "briefed.jsonl", rows(tok, briefed=4)), write(tmp_path / "short.jsonl", rows(tok, short=4))
    train, held_out = (briefed, short) if split == "train" else (short, briefed)
    r = lora_kit("finetune", "--data", train, "--eval-data", held_out, "--max-length", MAX_LENGTH, "--max-steps", 2,
                 "--output", tmp_path / "out")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"every {split} example's prompt fills max_length={MAX_LENGTH}") and "--max-length" in r.stderr
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_cli_finetune_on_long_prompts_learns_from_the_replies_and_counts_them(tok, tmp_path):
    "The issue's case: long prompts used to leave no reply token, so eval loss 0.000 -> 0.000 and nothing learned."
    train = write(tmp_path / "train.jsonl", rows(tok, short=6, long=4, briefed=2))
    held_out = write(tmp_path / "eval.jsonl", rows(tok, long=3, briefed=1))
    r = lora_kit("finetune", "--data", train, "--eval-data", held_out, "--max-length", MAX_LENGTH, "--max-steps", 2,
                 "--batch-size", 4, "--eval-examples", 10, "--output", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["examples"] == {"train": {"whole": 6, "truncated": 4, "dropped": 2},
                                   "eval": {"whole": 0, "truncated": 3, "dropped": 1}}
    assert metrics["eval_loss_before"] > 0.1 and metrics["eval_loss_after"] > 0.1  # measured on the replies of long prompts
    assert all(h["loss"] > 0 for h in metrics["history"])
    assert f"6 of 12 train examples were longer than max_length={MAX_LENGTH}: 4 kept with their prompt cut, 2 dropped" in r.stderr
    assert f"4 of 4 eval examples were longer than max_length={MAX_LENGTH}: 3 kept with their prompt cut, 1 dropped" in r.stderr
