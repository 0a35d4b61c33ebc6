"""builtin:pystdlib-qa: questions and first-paragraph answers cut from a (here: written) standard library."""

from __future__ import annotations

from gptforge.data.pystdlib_qa import first_paragraph, qa_pairs, qa_records

MODULE = '''"""Tools for working with widgets in a friendly way.

More detail that is not part of the answer.
"""


def make(x):
    """Build a widget from x and return it to the caller.

    Details.
    """


def _private():
    """A private helper that must not become a question."""


class Widget:
    """A widget that can be turned on and off, as needed."""

    def spin(self):
        """Spin the widget around its axis until it stops."""

    def short(self):
        """Too short."""
'''


def test_pairs_from_a_written_library(tmp_path):
    (tmp_path / "widgets.py").write_text(MODULE)
    (tmp_path / "_hidden.py").write_text(MODULE)  # private modules are skipped
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text('"""The pkg package collects several widget helpers."""\n')
    (tmp_path / "broken.py").write_text("def (:\n")  # does not parse: skipped, not fatal
    pairs = list(qa_pairs(tmp_path))
    assert pairs == [  # a folder's files first, then its subfolders
        ("What is the `widgets` module for?", "Tools for working with widgets in a friendly way."),
        ("What does `widgets.make` do?", "Build a widget from x and return it to the caller."),
        ("What is `widgets.Widget`?", "A widget that can be turned on and off, as needed."),
        ("What does `widgets.Widget.spin` do?", "Spin the widget around its axis until it stops."),
        ("What is the `pkg` module for?", "The pkg package collects several widget helpers."),
    ]
    assert list(qa_pairs(tmp_path)) == pairs  # deterministic
    record = next(qa_records(tmp_path))
    assert record == {"messages": [{"role": "user", "content": pairs[0][0]},
                                   {"role": "assistant", "content": pairs[0][1]}]}


def test_first_paragraph_is_one_line_and_signatures_are_skipped():
    assert first_paragraph("  Join two\n    paths into one.\n\n  More.") == "Join two paths into one."
    assert first_paragraph("dumps(obj, *, indent=None) -> str") is None
    assert first_paragraph("x" * 500) is None
