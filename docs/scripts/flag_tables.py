#!/usr/bin/env python
"""Write the "All flags" tables of docs/dit.md, controlnet.md and dreambooth.md from the scripts' own parsers,
and dreambooth.md's table of upstream's DreamBooth flags (from docs/upstream_dreambooth_lora_flags.json).

    python docs/scripts/flag_tables.py          # rewrite the tables in place
    python docs/scripts/flag_tables.py --check  # exit 1 if a table is out of date (the tests run this)

The tables sit between ``<!-- flags:begin -->`` and ``<!-- flags:end -->`` (upstream's: ``<!-- upstream-flags:begin
-->`` and ``<!-- upstream-flags:end -->``); nothing else is touched.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
BEGIN, END = "<!-- flags:begin -->", "<!-- flags:end -->"
UPSTREAM_BEGIN, UPSTREAM_END = "<!-- upstream-flags:begin -->", "<!-- upstream-flags:end -->"
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


def _upstream_value(value: object) -> str:
    if value is False:
        return "off"
    if value is True:
        return "on"
    return "none" if value is None else f"`{value}`"


def upstream_flag_table() -> str:
    """Every flag of diffusers' four DreamBooth LoRA scripts (docs/upstream_dreambooth_lora_flags.json), its
    default in each (— where the script lacks it) and what train_dreambooth_lora_difftuning.py does with it."""
    import json

    import model_families as mf
    import train_dreambooth_lora_difftuning as script

    upstream = json.load(open(os.path.join(ROOT, "docs", "upstream_dreambooth_lora_flags.json")))
    families = {"sd": mf.StableDiffusionFamily, "sdxl": mf.StableDiffusionXLFamily,
                "sd3": mf.StableDiffusion3Family, "flux": mf.FluxFamily}
    names = {"sd": "SD", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux"}
    out = ["| flag | SD | SDXL | SD3 | Flux | here |", "|---|---|---|---|---|---|"]
    for flag, defaults in upstream["flags"].items():
        if f"--{flag}" in script.REFUSED_FLAGS:
            status = f"refused: {script.REFUSED_FLAGS[f'--{flag}']}"
        elif flag in script.UPSTREAM_DIFFERENCES:
            status = f"accepted; default {script.UPSTREAM_DIFFERENCES[flag]}"
        elif flag in mf.FAMILY_FLAGS:
            owner = mf.FAMILY_FLAGS[flag][0]
            takes = [names[k] for k, f in families.items() if flag in f.flag_defaults
                     or (f.flow_matching and flag in mf.DENSITY_FLAGS)]
            others = [names[k] for k in families if names[k] not in takes]
            status = f"accepted on {', '.join(takes)} with upstream's default" + (
                f"; refused on {', '.join(others)} ({owner})" if others else "")
        else:
            status = "accepted with upstream's default" + (
                " (per family)" if len({repr(v) for v in defaults.values()}) > 1 else "")
            missing = [names[k] for k in families if k not in defaults]
            if missing:
                status += f"; also on {', '.join(missing)}"
        cells = [_upstream_value(defaults[k]) if k in defaults else "—" for k in families]
        status = status.replace("|", "\\|")
        out.append(f"| `--{flag}` | {' | '.join(cells)} | {status} |")
    return "\n".join(out) + "\n"


def _replace_section(text: str, begin: str, end: str, table: str, path: str) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"error: {path} has no {begin} ... {end} section.")
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n\n{table}\n{end}{rest.split(end, 1)[1]}"


def rendered(doc: str) -> tuple[str, str]:
    """(current text, text with the tables regenerated) of docs/<doc>."""
    import importlib

    path = os.path.join(ROOT, "docs", doc)
    text = open(path).read()
    fresh = _replace_section(text, BEGIN, END, flag_table(importlib.import_module(DOCS[doc]).build_parser()), path)
    if doc == "dreambooth.md":
        fresh = _replace_section(fresh, UPSTREAM_BEGIN, UPSTREAM_END, upstream_flag_table(), path)
    return text, fresh


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
