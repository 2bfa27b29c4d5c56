"""The README documents every flag of every script, its commands are the ones CI runs, and its Chinese translation
(README.zh-CN.md) keeps in step with it."""

from __future__ import annotations

import difflib
import importlib
import re

import pytest

from vlcap import cli

from helpers import REPO

SCRIPTS = ["data2csv", "csv2json", "train", "infer", "make_offline_model", "make_coco_folder"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_is_in_the_readme(name):
    readme = (REPO / "README.md").read_text()
    module = importlib.import_module(name)
    flags = ["--" + k.lower().replace("_", "-") for k in cli.settings_of(vars(module))]
    assert flags, f"{name} has no settings?"
    missing = [f for f in flags if f"`{f}" not in readme and f"{f}`" not in readme]
    assert not missing, f"README does not mention {name}.py's {missing}"


def test_ci_runs_the_readmes_commands():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    for command in ["python3 -m venv .venv && .venv/bin/pip install -r requirements.txt", ".venv/bin/python -m pytest"]:
        assert command in readme and command in ci


# The Chinese README (README.zh-CN.md) is a translation of README.md for readers of the Chinese tutorial. Its prose is
# Chinese, but everything a reader types or clicks is the same: every code block line for line, every inline-code span,
# every flag, link, image and number. The checks below compare the two files; each returns its findings as lines, so
# test_the_checks_catch_a_drifted_translation can show that they fail when the translation falls behind.

README_EN, README_ZH = "README.md", "README.zh-CN.md"
LANGUAGE_LINE = {README_EN: "**English** | [中文](README.zh-CN.md)", README_ZH: "[English](README.md) | **中文**"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def readme(name: str) -> str:
    return (REPO / name).read_text(encoding="utf-8")


def code_blocks(text: str) -> list[tuple[str, list[str]]]:
    """Every fenced code block as (language, lines), in order."""
    return [(m.group(1), m.group(2).splitlines()) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def code_spans(text: str) -> list[str]:
    """The inline-code spans of the prose, whitespace collapsed (a span may wrap onto the next line)."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose(text))]


def flags_in_backticks(text: str) -> set[str]:
    return {flag for span in code_spans(text) for flag in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", span)}


def links(text: str) -> list[str]:
    """Targets of links and images, then bare URLs, in order. Left out: in-page anchors (#...), whose headings differ,
    and the link to the other README (test_the_readmes_link_each_other_at_the_top)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", prose(text))
    targets = [t for t in targets if not t.startswith("#") and t not in LANGUAGE_LINE]
    return targets + re.findall(r"(?<!\()https?://[^\s`)\]>]+", prose(text))


def images(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", prose(text))


def headings(text: str) -> list[tuple[int, str]]:
    return [(len(m.group(1)), m.group(2).strip()) for m in re.finditer(r"^(#{1,6}) (.+)$", prose(text), re.MULTILINE)]


def anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped (CJK characters kept), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def numbers(text: str) -> set[str]:
    """Every number in the file (digits, with decimal points and thousands commas), code blocks included."""
    return set(re.findall(r"\d+(?:[.,]\d+)*", text))


def command_differences(en: str, zh: str) -> list[str]:
    """Code blocks that are not the same, line for line and in the same order, in both files."""
    a, b = code_blocks(en), code_blocks(zh)
    problems = [f"{README_EN} has {len(a)} code blocks, {README_ZH} {len(b)}"] if len(a) != len(b) else []
    lines_a = [f"```{lang}: {line}" for lang, block in a for line in block]
    lines_b = [f"```{lang}: {line}" for lang, block in b for line in block]
    if lines_a != lines_b:
        diff = difflib.unified_diff(lines_a, lines_b, README_EN, README_ZH, lineterm="", n=0)
        problems += [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    return problems


def flag_differences(en: str, zh: str) -> list[str]:
    a, b = flags_in_backticks(en), flags_in_backticks(zh)
    return [f"only in {README_EN}: `{f}`" for f in sorted(a - b)] + [
        f"only in {README_ZH}: `{f}`" for f in sorted(b - a)
    ]


def span_differences(en: str, zh: str) -> list[str]:
    """Every inline-code span of README.md is in the translation; the translation's spans are README.md's spans or
    come from its code blocks (where it explains their English comments)."""
    in_code = "\n".join(line for _, block in code_blocks(en) for line in block)
    a, b = set(code_spans(en)), set(code_spans(zh))
    return [f"only in {README_EN}: `{s}`" for s in sorted(a - b)] + [
        f"only in {README_ZH}: `{s}`" for s in sorted(b - a) if s not in in_code
    ]


def link_differences(en: str, zh: str) -> list[str]:
    problems = []
    if links(en) != links(zh):
        problems.append(f"links differ: {README_EN} {links(en)} vs {README_ZH} {links(zh)}")
    if images(en) != images(zh):
        problems.append(f"images differ: {README_EN} {images(en)} vs {README_ZH} {images(zh)}")
    return problems


def top_link_problems(name: str, text: str) -> list[str]:
    top = text.splitlines()[:5]
    return [] if LANGUAGE_LINE[name] in top else [f"{name} does not start with {LANGUAGE_LINE[name]!r}"]


def structure_differences(en: str, zh: str) -> list[str]:
    problems = []
    if [level for level, _ in headings(en)] != [level for level, _ in headings(zh)]:
        problems.append(f"sections differ: {headings(en)} vs {headings(zh)}")
    rows = [[line.count("|") for line in prose(t).splitlines() if line.startswith("|")] for t in (en, zh)]
    if rows[0] != rows[1]:
        problems.append(
            f"tables differ: {README_EN} has {len(rows[0])} table rows, {README_ZH} {len(rows[1])}, "
            "or their columns differ"
        )
    return problems


def number_differences(en: str, zh: str) -> list[str]:
    a, b = numbers(en), numbers(zh)
    return [f"only in {README_EN}: {n}" for n in sorted(a - b)] + [f"only in {README_ZH}: {n}" for n in sorted(b - a)]


CHECKS = [
    command_differences,
    flag_differences,
    span_differences,
    link_differences,
    structure_differences,
    number_differences,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_the_chinese_readme_keeps_in_step(check):
    problems = check(readme(README_EN), readme(README_ZH))
    assert not problems, f"{README_ZH} is not in step with {README_EN}:\n" + "\n".join(problems)


def test_the_readmes_link_each_other_at_the_top():
    problems = [p for name in (README_EN, README_ZH) for p in top_link_problems(name, readme(name))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", [README_EN, README_ZH])
def test_links_lead_somewhere(name):
    """Every file a README links to exists, and every in-page link names one of its headings."""
    text = readme(name)
    files = [t for t in links(text) if not re.match(r"https?://", t)]
    missing = [t for t in files if not (REPO / t.split("#")[0]).exists()]
    ids = {anchor(h) for _, h in headings(text)}
    dangling = [t for t in re.findall(r"\]\((#[^)\s]+)\)", prose(text)) if t[1:] not in ids]
    assert not missing and not dangling, f"{name}: missing files {missing}, anchors without a heading {dangling}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_is_in_both_readmes(name):
    """test_every_flag_is_in_the_readme for the translation too, and as a whole flag (`--n` is not `--no-adapter`)."""
    module = importlib.import_module(name)
    flags = {cli.flag_of(k) for k in cli.settings_of(vars(module))}
    for readme_name in (README_EN, README_ZH):
        missing = sorted(flags - flags_in_backticks(readme(readme_name)))
        assert not missing, f"{readme_name} does not mention {name}.py's {missing}"


def test_the_checks_catch_a_drifted_translation():
    """Each check finds a translation that fell behind: a command, a flag, a link, the link back, a number."""
    en, zh = readme(README_EN), readme(README_ZH)
    command = ".venv/bin/python -m pytest\n"
    assert command in zh
    assert command_differences(en, zh.replace(command, "", 1))
    assert command_differences(en, zh.replace("--score\n", "--score --html x.html\n", 1))
    assert flag_differences(en, zh.replace("`--swanlab-require-cloud`", "swanlab-require-cloud"))
    assert span_differences(en, zh.replace("`OUTPUT_DIR/eval.html`", "eval.html"))
    assert link_differences(en, zh.replace("(docs/eval-page.png)", "(docs/eval.png)"))
    assert link_differences(en, zh.replace("[bench/RESULTS.md](bench/RESULTS.md)", "bench/RESULTS.md", 1))
    assert top_link_problems(README_ZH, zh.replace(LANGUAGE_LINE[README_ZH], "**中文**"))
    assert structure_differences(en, zh.replace("\n## 速度\n", "\n速度\n"))
    assert number_differences(en, zh.replace("4.5 s / 64 ms", "4.6 s / 64 ms"))
