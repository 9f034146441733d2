"""Data path: JSONL errors name file:line, assistant masks match the template's rendering, packing invariants."""

import json
import re

import pytest

from rlhf_engine.data.builtin import demo_conversations
from rlhf_engine.data.chat import parse_conversation, tokenize_conversation
from rlhf_engine.data.reader import DataError, read_jsonl
from rlhf_engine.data.packing import IGNORE_INDEX, PAD_DOCUMENT, Example, collate, next_token_example, pack
from rlhf_engine.data.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = [m["content"] for r in demo_conversations(200) for m in r["messages"]]
    return train_bpe_tokenizer(texts, vocab_size=300)


def test_malformed_rows_name_file_and_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    cases = {
        "{not json": "not valid JSON",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}): "messages[0].role is 'robot'",
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}): "at least one assistant",
        json.dumps({"text": "x"}): "'messages' list",
        json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}): "content must be a string",
    }
    for bad, why in cases.items():
        path = tmp_path / "rows.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + bad + "\n")
        with pytest.raises(DataError, match=rf"rows\.jsonl:3: .*{re.escape(why)}"):
            list(read_jsonl(path, parse_conversation))


def test_malformed_jsonl_errors_report_the_column_of_the_offending_character(tmp_path):
    """The reported column (1-based characters) is where the line goes wrong, shown marked in an excerpt;
    a stray comma is reported at the comma; non-ASCII text before it counts one column per character."""
    cases = {
        '{"prompt": "p", "chosen": "a",}': (30, ">>,<<}", "trailing comma before '}'"),
        '{"prompt": "p" "chosen": "a"}': (16, '"p" >>"<<chosen', "Expecting ',' delimiter"),
        '{"prompt": "été", "chosen": "a" "rejected": "b"}': (33, '"a" >>"<<rejected', "Expecting ',' delimiter"),
        '{"prompt": ["p",], "chosen": "a"}': (16, '"p">>,<<]', "trailing comma before ']'"),
    }
    for bad, (column, marked, why) in cases.items():
        assert bad[column - 1] in ',"'  # the case itself: the column names the offending character
        path = tmp_path / "rows.jsonl"
        path.write_text('{"prompt": "ok", "chosen": "a", "rejected": "b"}\n' + bad + "\n", encoding="utf-8")
        with pytest.raises(DataError) as info:
            list(read_jsonl(path, lambda row: row))
        msg = str(info.value)
        assert msg.startswith(f"{path}:2: not valid JSON at column {column}: {why}: ") and marked in msg, msg
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a byte-order mark is not an error"}\r\n')
    assert list(read_jsonl(path, lambda row: row)) == [{"prompt": "a byte-order mark is not an error"}]


def test_assistant_mask_covers_exactly_the_assistant_turns(tokenizer):
    conv = parse_conversation({"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Reverse 'stone'."},
        {"role": "assistant", "content": "enots"},
        {"role": "user", "content": "And 'cloud'?"},
        {"role": "assistant", "content": "duolc"},
    ]})
    ids, mask = tokenize_conversation(tokenizer, conv)
    rendered = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in conv], tokenize=True)
    rendered = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    assert ids == rendered
    learned = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert learned == "enots<|im_end|>\nduolc<|im_end|>\n"  # each turn's content and end-of-turn marker
    hidden = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert "Reverse 'stone'." in hidden and "enots" not in hidden


def test_next_token_labels_shift_and_mask():
    ex = next_token_example([5, 6, 7, 8, 9], [False, False, True, True, False], max_len=5)
    assert ex.labels == [IGNORE_INDEX, 7, 8, IGNORE_INDEX, IGNORE_INDEX]
    short = next_token_example([5, 6, 7, 8, 9], [False, False, True, True, True], max_len=3)
    assert short.input_ids == [5, 6, 7] and short.labels == [IGNORE_INDEX, 7, IGNORE_INDEX]


def test_pack_places_every_example_once_within_budget():
    import random

    rng = random.Random(0)
    examples = [Example([1] * n, [IGNORE_INDEX] * n) for n in (rng.randint(1, 40) for _ in range(300))]
    rows = pack(examples, seq_len=64)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(examples)))
    assert all(sum(len(examples[i].input_ids) for i in row) <= 64 for row in rows)
    with pytest.raises(ValueError, match="truncate first"):
        pack([Example([1] * 65, [0] * 65)], seq_len=64)


def test_collate_marks_documents_and_padding():
    examples = [Example([1, 2, 3], [2, 3, IGNORE_INDEX]), Example([4, 5], [5, IGNORE_INDEX])]
    batch = collate(examples, [[0, 1]], seq_len=7, pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 0, 0]]
    assert batch.document_ids.tolist() == [[0, 0, 0, 1, 1, PAD_DOCUMENT, PAD_DOCUMENT]]
    assert batch.labels.tolist() == [[2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.counts() == {"tokens": 5, "targets": 3}


def test_builtin_data_is_deterministic_and_answers_are_right():
    a, b = demo_conversations(50, seed=3), demo_conversations(50, seed=3)
    assert a == b and a != demo_conversations(50, seed=4)
    for row in a:
        user, answer = row["messages"][-2]["content"], row["messages"][-1]["content"]
        if user.startswith("Reverse the word"):
            assert answer == user.split("'")[1][::-1]
        if user.startswith("What is"):
            x, _, y = user.removeprefix("What is ").rstrip("?").split()
            assert answer.endswith(f"is {int(x) + int(y)}.")


# ---------------------------------------------------------------------------------------------- preference rows

from rlhf_engine.data.preference import parse_choice, parse_ranking, rule_parser  # noqa: E402
from rlhf_engine.data.reader import read_rows  # noqa: E402

CHAT = [{"role": "user", "content": "hi"}]
DIALOGUE = CHAT + [{"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize("parse,bad,why", [
    (parse_ranking, {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 2]}, "one rank per response (3)"),
    (parse_ranking, {"prompt": "p", "responses": ["a", "b"], "ranking": [2, 2]}, "all responses are tied"),
    (parse_ranking, {"prompt": "p", "responses": ["a"] * 10, "ranking": list(range(1, 11))}, "2..9"),
    (parse_ranking, {"prompt": "p", "responses": [], "ranking": []}, "2..9"),
    (parse_ranking, {"prompt": "p", "responses": ["a", "b"], "ranking": [1, "2"]}, "integers >= 1"),
    (parse_ranking, {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]}, "integers >= 1"),
    (parse_ranking, {"prompt": "p", "responses": ["a", 3], "ranking": [1, 2]}, "'responses'[1] must be a string"),
    (parse_ranking, {"prompt": "p", "chosen": "a"}, "missing key(s) ['rejected']"),
    (parse_ranking, {"prompt": "", "chosen": "a", "rejected": "b"}, "empty string"),
    (parse_ranking, {"prompt": CHAT + [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
     "must end with a user"),
    (parse_ranking, {"prompt": "p", "chosen": "a", "rejected": "b", "score": 1}, "unknown key(s) ['score']"),
    (parse_choice, {"prompt": "p", "responses": ["a", "b"], "chosen": 2}, "index into 'responses' (0..1)"),
    (parse_choice, {"prompt": "p", "responses": ["a"], "chosen": 0}, "at least 2"),
    (rule_parser(["harm"]), {"messages": DIALOGUE, "labels": {"spam": True}}, "unknown rule(s) ['spam']"),
    (rule_parser(["harm"]), {"messages": DIALOGUE, "labels": {"harm": "maybe"}}, "true (violated), false or \"unsure\""),
    (rule_parser(["harm"]), {"messages": DIALOGUE, "labels": {}}, "non-empty object"),
])
def test_bad_preference_rows_name_file_line_and_problem(tmp_path, parse, bad, why):
    good = {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 2]} if parse is parse_ranking else (
        {"prompt": "p", "responses": ["a", "b"], "chosen": 0} if parse is parse_choice else
        {"messages": DIALOGUE, "labels": {"harm": False}})
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=rf"prefs\.jsonl:3: .*{re.escape(why)}"):
        read_rows(path, parse)


def test_unsure_labels_are_dropped_and_single_rule_rows_parse():
    parse = rule_parser(["harm", "spam"])
    row = parse({"messages": DIALOGUE, "labels": {"harm": True, "spam": "unsure"}})
    assert row.labels == (("harm", True),)
    assert parse({"messages": DIALOGUE, "rule": "spam", "violated": False}).labels == (("spam", False),)


def test_parquet_rows_and_empty_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 2, 2]},
            {"prompt": "q", "responses": ["x", "y"], "ranking": [1, 1]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    with pytest.raises(DataError, match=r"r\.parquet:row 2: all responses are tied"):
        read_rows(tmp_path / "r.parquet", parse_ranking)
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "ok.parquet")
    assert read_rows(tmp_path / "ok.parquet", parse_ranking)[0].pairs() == [(0, 1), (0, 2)]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        read_rows(tmp_path / "empty.jsonl", parse_ranking)
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        read_rows(tmp_path / "missing.jsonl", parse_ranking)


def test_conversational_response_tokens_are_the_assistant_turn(tokenizer):
    from rlhf_engine.data.preference import tokenize_response

    ids, n_prompt = tokenize_response(tokenizer, parse_ranking(
        {"prompt": CHAT, "chosen": "hello", "rejected": "bye"}).prompt, "hello")
    assert tokenizer.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(ids[n_prompt:]) == "hello<|im_end|>\n"


def test_sft_text_rows_learn_every_token(tokenizer):
    from rlhf_engine.data.chat import parse_sft_row, tokenize_sft_row

    ids, learn = tokenize_sft_row(tokenizer, parse_sft_row({"text": "plain text"}))
    assert all(learn) and ids[-1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="non-empty string"):
        parse_sft_row({"text": ""})
