"""lora_kit.data on real files: loading, checks with file and row, templates, label masks, truncation counts, packing whole examples.

The truncation rule itself (the prompt cut before the reply, drops, the CLI's exit) is tested in test_truncation.py."""
import csv, json, warnings

import pytest, torch
from transformers import AutoTokenizer

from lora_kit.data import (DataError, collate, demo_path, load_instructions, tokenize_dataset, tokenize_messages,
                           show_loss_tokens)
from lora_kit.tiny import base_path

ROWS = [{"instruction": "Translate to Indonesian:", "input": "the cat eats the fish.", "output": "kucing itu makan ikan itu."},
        {"instruction": "Say hello in Indonesian.", "input": "", "output": "halo."}]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(base_path())


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_demo_task_loads_every_line():
    for split in ("train", "eval"):
        lines = [l for l in demo_path(split).read_text(encoding="utf-8").splitlines() if l.strip()]
        ds = load_instructions(demo_path(split))
        assert len(ds) == len(lines)
        first = json.loads(lines[0])
        assert ds[0]["messages"] == [{"role": "user", "content": f"{first['instruction']}\n\n{first['input']}"},
                                     {"role": "assistant", "content": first["output"]}]


def test_jsonl_json_csv_and_chat_shapes_agree(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "a.json").write_text(json.dumps(ROWS), encoding="utf-8")
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"]); w.writeheader(); w.writerows(ROWS)
    chat = [{"messages": [{"role": "user", "content": "Translate to Indonesian:\n\nthe cat eats the fish."},
                          {"role": "assistant", "content": "kucing itu makan ikan itu."}]},
            {"messages": [{"role": "user", "content": "Say hello in Indonesian."}, {"role": "assistant", "content": "halo."}]}]
    expected = [r["messages"] for r in chat]
    for path in (jsonl, tmp_path / "a.json", tmp_path / "a.csv", write_jsonl(tmp_path / "chat.jsonl", chat)):
        assert load_instructions(path)["messages"] == expected, path


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Say hello in Indonesian.", "answer": "halo."}])
    with pytest.raises(DataError, match="columns="): load_instructions(path)
    ds = load_instructions(path, columns={"instruction": "question", "output": "answer"})
    assert ds[0]["messages"][1] == {"role": "assistant", "content": "halo."}


@pytest.mark.parametrize("line, problem", [
    ('{"instruction": "Say hi"}', "missing field 'output'"),
    ('{"instruction": "Say hi", "output": "   "}', "empty response"),
    ('{"instruction": "Say hi", "output": 42}', "must be text, got int"),
    ('{"instruction": ["Say hi"], "output": "hi"}', "must be text, got list"),
    ('{"instruction": "Say hi", "output": "hi"', "not valid JSON"),
    ('["Say hi", "hi"]', "must be an object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "empty response"),
])
def test_bad_row_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e: load_instructions(path)
    assert f"{path} line 3" in str(e.value) and problem in str(e.value)


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + '{"instruction": "Café", "output": "kafe"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl line 2: not UTF-8.*UTF-8"): load_instructions(path)


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "a.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown format"): load_instructions(tmp_path / "a.txt")
    with pytest.raises(DataError, match="no such file"): load_instructions(tmp_path / "nope.jsonl")


def test_llama2_labels_mask_exactly_the_prompt(tok):
    messages = load_instructions(demo_path("eval"))[0]["messages"]
    user, reply = messages[0]["content"], messages[1]["content"]
    ex = tokenize_messages(messages, tok, "llama2")
    prompt = f"<s>[INST] {user} [/INST]"  # the LLaMA-2 chat format, written out
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == tok(f"{prompt} {reply} </s>", add_special_tokens=False)["input_ids"]
    assert ex["labels"][:len(prompt_ids)] == [-100] * len(prompt_ids)
    assert ex["labels"][len(prompt_ids):] == ex["input_ids"][len(prompt_ids):]
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"][-1] == tok.eos_token_id
    assert show_loss_tokens(ex["input_ids"], ex["labels"], tok) == f"<s>[INST] {user} [/INST]⟦ {reply} </s>⟧"


def test_llama2_system_prompt_and_multi_turn(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
                {"role": "assistant", "content": "hi."}, {"role": "user", "content": "Again."},
                {"role": "assistant", "content": "hi again."}]
    ex = tokenize_messages(messages, tok, "llama2")
    expected = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nSay hi. [/INST] hi. </s><s>[INST] Again. [/INST] hi again. </s>"
    assert tok.decode(ex["input_ids"]) == expected
    assert tok.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l != -100]) == " hi. </s> hi again. </s>"
    assert tokenize_messages(messages, tok, "chat") == ex  # the tokenizer's own (LLaMA-2) chat template agrees


def test_alpaca_and_plain_templates(tok):
    messages = [{"role": "user", "content": "Say hello in Indonesian."}, {"role": "assistant", "content": "halo."}]
    alpaca = tokenize_messages(messages, tok, "alpaca")
    assert tok.decode(alpaca["input_ids"]) == ("<s>Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\nSay hello in Indonesian.\n\n### Response:\nhalo.</s>")
    plain = tokenize_messages(messages, tok, "plain")
    assert tok.decode(plain["input_ids"]) == "<s>Say hello in Indonesian.\nhalo.</s>"
    for ex in (alpaca, plain):
        assert tok.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l != -100]) == "halo.</s>"
    with pytest.raises(DataError, match="single-turn"):
        tokenize_messages(messages * 2, tok, "plain")


def test_truncation_is_counted(tok):
    ds = load_instructions(demo_path("eval"))
    full = [len(tokenize_messages(m, tok, max_length=10_000)["input_ids"]) for m in ds["messages"]]
    max_length = sorted(full)[len(full) // 2]  # the median length: some examples are cut, some are not
    expected_cut = sum(n > max_length for n in full)
    assert 0 < expected_cut < len(ds)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tokenize_dataset(ds, tok, max_length=max_length)
    assert sum(out["truncated"]) == expected_cut and len(out) == len(ds)  # short prompts: cut, none dropped
    messages = [str(w.message) for w in caught if "max_length" in str(w.message)]
    assert messages == [f"{expected_cut} of {len(ds)} train examples were longer than max_length={max_length}: {expected_cut} kept "
                        "with their prompt cut, 0 dropped (no response token left); raise max_length (--max-length) to keep them whole"]
    assert max(len(ids) for ids in out["input_ids"]) == max_length
    for ex, msgs in zip(out, ds["messages"]):  # every reply whole, cut or not (the old cut at the end lost reply tokens)
        reply = tok(f" {msgs[-1]['content']} </s>", add_special_tokens=False)["input_ids"]
        assert [i for i, l in zip(ex["input_ids"], ex["labels"]) if l != -100] == reply


def test_packing_keeps_every_example_whole_with_positions_from_zero(tok):
    "`tokenize_dataset(packing=True)`: fewer rows, none longer than max_length, each example's tokens and labels in one row."
    ds = load_instructions(demo_path("eval")).select(range(30))
    plain = tokenize_dataset(ds, tok, max_length=128)
    packed = tokenize_dataset(ds, tok, max_length=128, packing=True)
    assert len(packed) < len(plain) and max(len(ids) for ids in packed["input_ids"]) <= 128
    pieces = []
    for ids, labels, positions in zip(packed["input_ids"], packed["labels"], packed["position_ids"]):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        pieces += [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:])]
    assert sorted(pieces) == sorted(zip(plain["input_ids"], plain["labels"]))


def test_collate_pads_with_pad_and_ignore_index():
    batch = collate([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}], pad_token_id=3)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["input_ids"].dtype == torch.long


def test_masking_with_a_llama2_style_sentencepiece_tokenizer():
    "Template + masking give the ids of the whole text, and exactly the reply carries loss (no extra '▁' at the seam)."
    from lora_kit.data import demo_path, llama2_chat, llama2_style_tokenizer, load_instructions, tokenize_messages
    rows = load_instructions(demo_path("train"))
    tok = llama2_style_tokenizer([m["content"] for msgs in rows["messages"][:300] for m in msgs] + ["[INST] [/INST] <<SYS>>"])
    system = [{"role": "system", "content": "Answer in Indonesian."}]
    for messages in [*rows["messages"][:30], system + rows["messages"][0]]:
        example = tokenize_messages(messages, tok)
        text = "".join(t for t, _ in llama2_chat(messages))
        assert example["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        reply = [i for i, l in zip(example["input_ids"], example["labels"]) if l != -100]
        assert tok.convert_ids_to_tokens(reply)[-1] == "</s>" and not tok.convert_ids_to_tokens(reply)[0] == "▁"
        assert tok.decode(reply) == messages[-1]["content"].strip() + " </s>"
