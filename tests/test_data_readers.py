"""The reader layer: every record source gives (where, record) with one bad-line policy."""

from __future__ import annotations

import json

import pytest

from gptforge.data.readers import ReadReport, parse_hf_spec, read_records
from gptforge.errors import UserError


def test_jsonl_skips_malformed_lines_with_their_numbers_and_repairs_text(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{broken\n"just a string"\n{"b": "caf\xc3\xa9 \xff"}\n{"c": ["\\ud800", {"\\udc00": 2}]}\n')
    report = ReadReport()
    got = list(read_records(path, report))
    assert got == [(f"{path}:1", {"a": 1}), (f"{path}:5", {"b": "café \ufffd"}),
                   (f"{path}:6", {"c": ["\ufffd", {"\ufffd": 2}]})]
    assert report.count == 2 and report.examples == [
        f"{path}:3: not valid JSON (Expecting property name enclosed in double quotes); skipped",
        f"{path}:4: not a JSON object (a str); skipped"]
    assert (report.invalid_utf8, report.invalid_utf8_examples) == (
        1, [f"{path}:5: 1 invalid UTF-8 sequence(s) replaced by U+FFFD"])
    assert (report.lone_surrogates, report.lone_surrogate_examples) == (
        2, [f"{path}:6: 2 lone surrogate(s) replaced by U+FFFD"])
    assert report.bytes == path.stat().st_size
    assert report.summary().splitlines() == [
        f"2 malformed record(s) skipped (first: {path}:3: not valid JSON (Expecting property name enclosed in "
        "double quotes); skipped)",
        f"1 invalid UTF-8 sequence(s) replaced (first: {path}:5: 1 invalid UTF-8 sequence(s) replaced by U+FFFD)",
        f"2 lone surrogate(s) replaced (first: {path}:6: 2 lone surrogate(s) replaced by U+FFFD)"]


def test_examples_are_capped_but_everything_is_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("nope\n" * 50 + '{"ok": true}\n')
    report = ReadReport()
    assert [r for _, r in read_records(path, report)] == [{"ok": True}]
    assert report.count == 50 and len(report.examples) == 5 and report.examples[-1].startswith(f"{path}:5:")


def test_json_list_and_jsonl_named_json(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"x": 1}, 7, {"x": "\ud800"}], ensure_ascii=True))
    report = ReadReport()
    assert list(read_records(listed, report)) == [(f"{listed} item 0", {"x": 1}), (f"{listed} item 2", {"x": "\ufffd"})]
    assert report.count == 1 and report.lone_surrogates == 1
    lines = tmp_path / "lines.json"
    lines.write_text('{"x": 1}\n{"x": 2}\n')
    assert [r["x"] for _, r in read_records(lines, ReadReport())] == [1, 2]
    broken = tmp_path / "broken.json"
    broken.write_text('[{"x": 1},\n oops]')
    with pytest.raises(UserError, match=r"broken.json: invalid JSON at line 2 .*convert it to JSONL"):
        list(read_records(broken, ReadReport()))


def test_parquet_rows_and_required_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"], "n": [1, 2, 3]}), path)
    report = ReadReport()
    assert list(read_records(path, report, columns=["text"])) == [
        (f"{path} row 0", {"text": "a"}), (f"{path} row 1", {"text": None}), (f"{path} row 2", {"text": "c"})]
    assert report.bytes == path.stat().st_size
    with pytest.raises(UserError, match=r"d.parquet: no column 'body' \(found: text, n\); pick another"):
        list(read_records(path, ReadReport(), columns=["body"], hint="pick another"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="bad.parquet: not a readable Parquet file"):
        list(read_records(tmp_path / "bad.parquet", ReadReport()))


def damaged_parquet(path, rows=3072, row_group=1024, damaged_group=2):
    """A Parquet file whose footer and first row groups are intact and whose row group `damaged_group` has
    its compressed page bytes scrambled: it opens, and fails only when that row group is decoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"document {i} " * 20 for i in range(rows)]}), path,
                   row_group_size=row_group, compression="snappy")
    column = pq.ParquetFile(path).metadata.row_group(damaged_group).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    for k in range(start + 40, start + column.total_compressed_size - 10):  # past the page header
        data[k] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("failure", ["corrupt bytes", "ArrowInvalid"])
def test_a_parquet_file_damaged_mid_way_is_one_line_naming_it(tmp_path, monkeypatch, failure):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = damaged_parquet(tmp_path / "d.parquet")
    if failure == "ArrowInvalid":  # what a malformed page can raise instead of an I/O error
        def iter_batches(self, **kwargs):
            yield pa.record_batch({"text": ["ok"] * 3})
            raise pa.ArrowInvalid("Invalid column data\nmore detail")
        monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)
    seen = []
    with pytest.raises(UserError) as e:
        for where, _ in read_records(path, ReadReport(), what="source"):
            seen.append(where)
    message = str(e.value)
    n = 2048 if failure == "corrupt bytes" else 3
    assert message.startswith(f"source {path}: damaged Parquet file, unreadable after row {n} (")
    assert "re-create or re-download it" in message and "\n" not in message
    assert len(seen) == n  # the rows before the damage were read


def test_hub_datasets_through_an_injected_loader_and_spec_parsing():
    calls = []

    def loader(name, config):
        calls.append((name, config))
        return [{"t": "x"}, "not a mapping", {"t": "y"}]

    report = ReadReport()
    got = list(read_records("hf:someone/set:en", report, hf_loader=loader))
    assert got == [("hf:someone/set:en row 0", {"t": "x"}), ("hf:someone/set:en row 2", {"t": "y"})]
    assert calls == [("someone/set", "en")] and report.count == 1
    assert parse_hf_spec("hf:a/b") == ("a/b", None)
    with pytest.raises(UserError, match="write hf:NAME"):
        parse_hf_spec("hf:")

    def failing(name, config):
        yield {"t": "x"}
        raise ConnectionError("connection reset\nmore detail")

    with pytest.raises(UserError, match=r"hf:a/b: reading row 1 failed \(ConnectionError: connection reset\)"):
        list(read_records("hf:a/b", ReadReport(), hf_loader=failing))


def test_hub_dataset_from_a_local_folder_and_a_missing_split(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text('{"t": "a"}\n{"t": "b"}\n')
    for streaming in (True, False):
        assert [r["t"] for _, r in read_records(f"hf:{tmp_path / 'ds'}", ReadReport(), hf_streaming=streaming)] == \
            ["a", "b"]
    with pytest.raises(UserError, match="could not load hub dataset .* split test"):
        list(read_records(f"hf:{tmp_path / 'ds'}", ReadReport(), hf_split="test", hf_streaming=False))


def test_missing_empty_and_nothing_usable(tmp_path):
    with pytest.raises(UserError, match=r"chat data .*nope.jsonl does not exist"):
        list(read_records(tmp_path / "nope.jsonl", ReadReport(), what="chat data"))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(UserError, match="empty.jsonl is empty"):
        list(read_records(tmp_path / "empty.jsonl", ReadReport()))
    report = ReadReport()
    report.add("f.jsonl:3", "no messages")
    error = report.nothing_usable("chat data f.jsonl", "each line needs 'messages'")
    assert str(error) == "chat data f.jsonl: no usable records (1 skipped; first: f.jsonl:3: no messages); " \
                         "each line needs 'messages'"


def test_a_byte_order_mark_is_dropped_not_read_as_text(tmp_path):
    """Windows editors and PowerShell write UTF-8 with a BOM: it used to make the first JSONL record invalid
    JSON (skipped) and a .json array file unreadable."""
    bom = "\ufeff".encode()
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(bom + b'{"text": "one"}\n{"text": "two"}\n')
    array = tmp_path / "b.json"
    array.write_bytes(bom + b'[{"text": "one"}, {"text": "two"}]')
    for path in (jsonl, array):
        report = ReadReport()
        assert [record["text"] for _, record in read_records(path, report)] == ["one", "two"]
        assert report.count == 0 and report.examples == []
