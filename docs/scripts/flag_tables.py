#!/usr/bin/env python
"""Write the "All flags" tables of docs/dit.md, controlnet.md and dreambooth.md from the scripts' own parsers.

    python docs/scripts/flag_tables.py          # rewrite the tables in place
    python docs/scripts/flag_tables.py --check  # exit 1 if a table is out of date (the tests run this)

The tables sit between ``<!-- flags:begin -->`` and ``<!-- flags:end -->``; nothing else is touched.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
BEGIN, END = "<!-- flags:begin -->", "<!-- flags:end -->"
DOCS = {"dit.md": "train_dit_difftuning", "controlnet.md": "train_controlnet_difftuning",
        "dreambooth.md": "train_dreambooth_lora_difftuning"}


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if isinstance(action, argparse._StoreTrueAction) or (action.default is False and action.nargs == 0):
        return "off"
    if action.default is True:
        return "on"
    return "—" if action.default is None else f"`{action.default}`"


def flag_table(parser: argparse.ArgumentParser) -> str:
    """One markdown table per argument group, in --help's order."""
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        title = "Base model" if group.title in ("options", "optional arguments") else group.title
        out += [f"### {title}", "", "| flag | default | what it does |", "|---|---|---|"]
        for action in actions:
            names = " / ".join(f"`{o}`" for o in action.option_strings)
            text = (action.help or "").replace("|", "\\|").replace("\n", " ")
            if action.choices and "Choices" not in text:
                text += f" Choices: {', '.join(map(str, action.choices))}."
            out.append(f"| {names} | {_default(action)} | {text} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def rendered(doc: str) -> tuple[str, str]:
    """(current text, text with the table regenerated) of docs/<doc>."""
    import importlib

    path = os.path.join(ROOT, "docs", doc)
    text = open(path).read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {path} has no {BEGIN} ... {END} section.")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    table = flag_table(importlib.import_module(DOCS[doc]).build_parser())
    return text, f"{head}{BEGIN}\n\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Only check; exit 1 if a table is out of date.")
    args = parser.parse_args(argv)
    stale = []
    for doc in DOCS:
        current, fresh = rendered(doc)
        if current != fresh:
            stale.append(doc)
            if not args.check:
                with open(os.path.join(ROOT, "docs", doc), "w") as f:
                    f.write(fresh)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)} (run python docs/scripts/flag_tables.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
