import json
import re

import pytest

from data.schema import (
    SchemaError,
    load_llava_json,
    load_record_file,
    save_llava_json,
    validate_record,
    write_json_atomic,
)


def record(**overrides):
    rec = {
        "id": "abc",
        "image": "images/a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the circle?"},
            {"from": "gpt", "value": "red"},
        ],
    }
    rec.update(overrides)
    return rec


def turns(*pairs):
    return [{"from": role, "value": value} for role, value in pairs]


def error_of(rec, index=None, source=None) -> str:
    with pytest.raises(SchemaError) as info:
        validate_record(rec, index=index, source=source)
    return str(info.value)


def test_valid_records_pass():
    validate_record(record())
    validate_record(
        record(
            image=["a.png", "b.png"],
            conversations=turns(
                ("system", "Be brief."),
                ("human", "<image> and <image>: same?"),
                ("gpt", "no"),
                ("human", "Why?"),
                ("gpt", "Colours differ."),
            ),
        )
    )
    text_only = record(conversations=turns(("human", "Hi"), ("gpt", "Hello")))
    del text_only["image"]
    validate_record(text_only)
    validate_record(record(id=17, extra={"anything": 1}))  # integer ids and extra keys are allowed


def test_message_names_file_record_id_and_field():
    rec = record(conversations=turns(("human", "<image>\nq"), ("gpt", "a"), ("human", "q2"), ("bot", "a2")))
    assert error_of(rec, index=17, source="train.json") == (
        "train.json: record 17 (id 'abc'): conversations[3].from: expected 'human' or 'gpt', got 'bot'"
    )
    assert error_of(rec) == "record (id 'abc'): conversations[3].from: expected 'human' or 'gpt', got 'bot'"


Q, A = ("human", "<image> q"), ("gpt", "a")
NON_EMPTY = "expected a non-empty string, got"


@pytest.mark.parametrize(
    ("conversations", "field", "reason"),
    [
        ([], "conversations", "expected a non-empty list of turns, got an empty list"),
        ("hi", "conversations", "expected a non-empty list of turns, got string"),
        (["<image> hi"], "conversations[0]", "expected an object with 'from' and 'value', got string"),
        (
            turns(("gpt", "<image> a")),
            "conversations[0].from",
            "expected 'human' (turns alternate human/gpt), got",
        ),
        (
            turns(Q, ("human", "q")),
            "conversations[1].from",
            "expected 'gpt' (turns alternate human/gpt), got 'human'",
        ),
        (turns(Q, A, ("system", "s")), "conversations[2].from", "'system' is only allowed as the first turn"),
        (turns(Q, A, ("human", "q")), "conversations", "the last turn must be from 'gpt', got 'human'"),
        (turns(("system", "<image> s")), "conversations", "the last turn must be from 'gpt', got 'system'"),
        (turns(Q, ("gpt", "   ")), "conversations[1].value", f"{NON_EMPTY} '   '"),
        (turns(Q, ("gpt", 3)), "conversations[1].value", f"{NON_EMPTY} int"),
        ([{"from": "human"}, {"from": "gpt", "value": "a"}], "conversations[0].value", f"{NON_EMPTY} null"),
    ],
)
def test_conversation_errors(conversations, field, reason):
    message = error_of(record(conversations=conversations), index=2)
    assert message.startswith(f"record 2 (id 'abc'): {field}: {reason}")


def test_placeholder_count_must_match_images():
    too_few = record(image=["a.png", "b.png"])
    assert error_of(too_few).endswith(
        "conversations: 1 '<image>' placeholder(s) but 2 image(s); they must match"
    )
    no_image = record()
    del no_image["image"]
    assert "1 '<image>' placeholder(s) but 0 image(s)" in error_of(no_image)
    missing_placeholder = record(conversations=turns(("human", "What is it?"), ("gpt", "a cat")))
    assert "0 '<image>' placeholder(s) but 1 image(s)" in error_of(missing_placeholder)


def test_record_level_errors():
    assert error_of(["not", "a", "dict"], index=0) == "record 0: expected an object, got list"
    rec = record()
    del rec["id"]
    assert error_of(rec, index=1) == "record 1: id: missing"
    assert error_of(record(id=""), index=1) == "record 1 (id ''): id: expected a non-empty string, got ''"
    assert error_of(record(id=["x"])).endswith("id: expected a non-empty string, got ['x']")
    rec = record()
    del rec["conversations"]
    assert error_of(rec).endswith("conversations: missing")


def test_image_field_errors():
    assert error_of(record(image=5)).endswith("image: expected a string or a list of strings, got int")
    assert error_of(record(image="")).endswith("image: expected a non-empty string, got ''")
    bad_entry = record(image=["a.png", None], conversations=turns(("human", "<image><image>"), ("gpt", "x")))
    assert error_of(bad_entry).endswith("image[1]: expected a non-empty string, got null")


def test_schema_error_keeps_parts_as_attributes():
    with pytest.raises(SchemaError) as info:
        validate_record(record(image=5), index=4, source="x.json")
    err = info.value
    assert (err.source, err.index, err.record_id, err.field) == ("x.json", 4, "abc", "image")
    assert isinstance(err, ValueError)


def test_load_json_and_jsonl(tmp_path):
    records = [record(id=f"r{i}") for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert load_llava_json(tmp_path / "a.json") == records
    assert load_llava_json(tmp_path / "a.jsonl") == records


def test_load_reports_invalid_json_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"id": "a",\n   "conversations": [}\n]')
    with pytest.raises(SchemaError, match=re.escape(f"{path}: invalid JSON at line 3, column 22")):
        load_llava_json(path)
    lines = tmp_path / "bad.jsonl"
    lines.write_text(json.dumps(record()) + "\n" + '{"id": "b", \n')
    with pytest.raises(SchemaError, match=re.escape(f"{lines}: invalid JSON at line 2, column 13")):
        load_llava_json(lines)


def test_load_reports_wrong_top_level_missing_file_and_bad_record(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"id": "a"}')
    with pytest.raises(SchemaError, match="expected a JSON list of records, got object"):
        load_llava_json(path)
    with pytest.raises(SchemaError, match="nope.json: file not found"):
        load_llava_json(tmp_path / "nope.json")
    path = tmp_path / "train.json"
    path.write_text(json.dumps([record(), record(id="second", image=7)]))
    with pytest.raises(
        SchemaError, match=re.escape(f"{path}: record 1 (id 'second'): image: expected a string")
    ):
        load_llava_json(path)


def test_check_files(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"x")
    path = tmp_path / "d.json"
    both = record(
        id="two",
        image=["images/a.png", "images/b.png"],
        conversations=turns(("human", "<image><image>"), ("gpt", "x")),
    )
    path.write_text(json.dumps([record(), both]))
    assert len(load_llava_json(path)) == 2  # not checked by default
    with pytest.raises(SchemaError) as info:
        load_llava_json(path, check_files=True)
    assert str(info.value) == (
        f"{path}: record 1 (id 'two'): image[1]: image file not found: {tmp_path / 'images' / 'b.png'}"
    )


def test_load_record_file_skips_broken_records_unless_strict(tmp_path):
    good = [record(id="r0"), record(id="r2")]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([good[0], record(id="r1", conversations="hi"), good[1]]))
    loaded = load_record_file(path)
    assert loaded.records == good and loaded.indices == [0, 2] and loaded.total == 3
    assert [str(e) for e in loaded.errors] == [
        f"{path}: record 1 (id 'r1'): conversations: expected a non-empty list of turns, got string"
    ]
    with pytest.raises(SchemaError, match="record 1 .id 'r1'.: conversations"):
        load_record_file(path, strict=True)
    lines = tmp_path / "mixed.jsonl"
    lines.write_text(json.dumps(good[0]) + "\n{not json\n" + json.dumps(good[1]) + "\n")
    loaded = load_record_file(lines)
    assert loaded.records == good and loaded.indices == [0, 2]
    assert loaded.errors[0].index == 1 and "invalid JSON at line 2" in str(loaded.errors[0])
    with pytest.raises(SchemaError, match="invalid JSON at line 2"):
        load_record_file(lines, strict=True)
    whole = tmp_path / "object.json"
    whole.write_text("{}")
    with pytest.raises(SchemaError, match="expected a JSON list of records, got object"):
        load_record_file(whole)  # a file that is wrong as a whole always raises


def test_save_validates_then_writes_atomically(tmp_path):
    records = [record(id=f"r{i}") for i in range(2)]
    for name in ("out.json", "out.jsonl"):
        save_llava_json(tmp_path / name, records)
        assert load_llava_json(tmp_path / name) == records
    assert (tmp_path / "out.json").read_text().count("\n") == 4  # "[", one line per record, "]"
    with pytest.raises(SchemaError, match="record 1"):
        save_llava_json(tmp_path / "bad.json", [record(), record(image=3)])
    assert not (tmp_path / "bad.json").exists()
    write_json_atomic(tmp_path / "meta.json", {"n": 1})
    assert json.loads((tmp_path / "meta.json").read_text()) == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "meta.json",
        "out.json",
        "out.jsonl",
    ]  # no temp files
