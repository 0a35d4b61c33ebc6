"""One way to write counts and sizes, checked against values written out by hand."""

from gptforge.units import human_bytes, human_count


def test_counts_have_three_significant_digits_and_a_unit():
    cases = {0: "0", 7: "7", 999: "999", 999.6: "1.00k", 1000: "1.00k", 52_345: "52.3k", 999_960: "1.00M",
             17_867_008: "17.9M", 124_439_808: "124M", 1.3e9: "1.30B", 175e9: "175B", 2.5e15: "2500T",
             -1234: "-1.23k"}
    assert {n: human_count(n) for n in cases} == cases


def test_bytes_use_binary_units():
    assert [human_bytes(n) for n in (0, 1023, 1536, 3 * 2**30, 2**50)] == \
        ["0 B", "1023 B", "1.5 KiB", "3.0 GiB", "1,024.0 TiB"]
