"""What the three benchmarks (``run_benchmark``, ``controlnet_benchmark``, ``dreambooth_benchmark``)
share: running the real training script and the evaluation tools as child processes, one folder per
(arm, seed) that records the settings it was run with, and collecting the finished runs.

A run folder ``<output_dir>/runs/<arm>-seed<N>`` is reused only with the settings it was made with, so
an interrupted benchmark resumes where it stopped and a changed flag never mixes into old results.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from difftuning_common import ConfigError, atomic_write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env() -> dict:
    """The environment of every child: one CPU thread (the benchmarks run ``--jobs`` children side by side),
    no Hub access, and the repository importable (``python -m benchmark.<tool>`` from any folder)."""
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": path}


def refuse_secret_flags(parser: argparse.ArgumentParser, extra_flags: list[str]) -> None:
    """``--extra_flags`` are recorded (each run's settings.json, the committed records): a secret there would be
    written to disk. The children run offline anyway, so a token is refused, not passed on."""
    from training_plumbing import SECRET_FLAGS

    for flag in extra_flags:
        name = flag.lstrip("-").split("=", 1)[0]
        if flag.startswith("--") and name in SECRET_FLAGS:
            parser.error(f"--extra_flags --{name}: benchmark runs are recorded and run offline; a secret is never "
                         "passed to them (log in with `hf auth login` where a run needs the Hub).")


def script_command(script: str) -> list[str]:
    """The command line of one of the repository's training scripts."""
    return [sys.executable, os.path.join(ROOT, script)]


def tool_command(tool: str) -> list[str]:
    """The command line of a benchmark tool (``evaluate``, ``chain_of_forgetting``, ...)."""
    return [sys.executable, "-m", f"benchmark.{tool}"]


# A progress bar of tqdm as it lands in a log: "Steps:  45%|####5     | 900/2000 [01:23<01:40, 10.8it/s, loss=0.0312]".
_TQDM_BAR = re.compile(r"(?P<desc>[A-Za-z][\w ]*?): *(?P<percent>\d+)%\|[^|\r\n]*\| *(?P<done>\d+)/(?P<total>\d+) "
                       r"\[[\d:]+<(?P<left>[\d:?]+)(?P<postfix>[^\]\r\n]*)\]")
PROGRESS_EVERY = 10  # percent of a bar between two progress lines of a run on the console


def latest_progress(log_text: str) -> tuple[str, int, str] | None:
    """The newest tqdm bar in ``log_text`` as (its name, percent done, a readable line), or None."""
    bars = list(_TQDM_BAR.finditer(log_text))
    if not bars:
        return None
    bar = bars[-1]
    loss = re.search(r"loss=([-+\d.eE]+)", bar["postfix"])
    line = (f"{bar['desc'].strip()} {bar['done']}/{bar['total']}" + (f", loss {loss[1]}" if loss else "")
            + (f", {bar['left']} left" if bar["left"] != "?" else ""))
    return bar["desc"].strip(), int(bar["percent"]), line


def _read_tail(path: str, size: int = 8192) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - size))
        return f.read().decode("utf-8", errors="replace")


def run_step(cmd: list[str], log_path: str, what: str, poll_seconds: float = 5.0) -> None:
    """Run one child with its output in ``log_path``, saying when it starts and ends and, while it runs, a
    line each time one of its progress bars passes another PROGRESS_EVERY percent (steps, loss, time left),
    so a console shows every run moving although the bars themselves go to the log. A failure is one
    sentence naming the log."""
    start = time.time()
    print(f"[benchmark] {what}: started (log: {os.path.relpath(log_path)})", flush=True)
    shown: tuple[str, int] | None = None
    with open(log_path, "w") as log, subprocess.Popen(cmd, env=child_env(), stdout=log,
                                                      stderr=subprocess.STDOUT) as child:
        try:
            while True:
                try:
                    returncode = child.wait(timeout=poll_seconds)
                    break
                except subprocess.TimeoutExpired:
                    progress = latest_progress(_read_tail(log_path))
                if progress and (shown is None or progress[0] != shown[0]
                                 or progress[1] >= shown[1] + PROGRESS_EVERY):
                    shown = progress[0], progress[1] - progress[1] % PROGRESS_EVERY
                    print(f"[benchmark] {what.split(' (')[0]}: {progress[2]}", flush=True)  # without its aside
        except BaseException:  # Ctrl-C or an error here: the child goes too, as with subprocess.run
            child.kill()
            raise
    print(f"[benchmark] {what}: {'done' if returncode == 0 else 'FAILED'} in {time.time() - start:.0f} s",
          flush=True)
    if returncode != 0:
        errors = [line.strip() for line in open(log_path) if line.startswith("error: ") or "Error: " in line]
        reason = errors[-1].rstrip(".") if errors else "no error line"
        raise SystemExit(f"error: {what} exited with status {returncode} ({reason}); full log: {log_path}")


def run_settings(args: argparse.Namespace, names: Iterable[str], model_flag: str) -> dict:
    """The settings a run folder records: ``names`` from ``args``, the model folder as an absolute path."""
    settings = {name: getattr(args, name) for name in names}
    settings[model_flag] = os.path.abspath(settings[model_flag])
    return settings


def check_run_settings(out: str, settings: dict, defaults: dict | None = None) -> None:
    """Refuse to reuse (or continue) a run made with other settings; leaves the run untouched. ``defaults``:
    the value of a setting added after older runs were made, which they ran with."""
    path = os.path.join(out, "settings.json")
    if not os.path.exists(out):
        return
    if not os.path.exists(path):
        raise ConfigError(f"{out} has no settings.json, so it cannot be reused safely: delete it or use another "
                          "--output_dir.")
    stored = json.load(open(path))
    for name, value in settings.items():
        if stored.get(name, (defaults or {}).get(name)) != value:
            raise ConfigError(f"{out} was run with --{name} {stored.get(name)}, not {value}: use another "
                              "--output_dir or the same settings.")


def start_run(output_dir: str, arm: str, seed: int, settings: dict, defaults: dict | None = None) -> str:
    """The run folder of (arm, seed), checked against ``settings`` and recording them; returns its path."""
    out = os.path.join(output_dir, "runs", f"{arm}-seed{seed}")
    check_run_settings(out, settings, defaults)
    if not os.path.exists(os.path.join(out, "settings.json")):
        os.makedirs(out, exist_ok=True)
        atomic_write_json(os.path.join(out, "settings.json"), settings)
    return out


def train_once(cmd: list[str], out: str, done_file: str, what: str) -> None:
    """Run the training command unless ``out`` already holds ``done_file`` (the final weights); record the
    wall time, which the tables report. A run that was interrupted resumes from its newest checkpoint (the
    scripts resume bit-exact); its recorded time is then that of the last attempt only."""
    if os.path.exists(os.path.join(out, done_file)):
        return
    start = time.time()
    run_step([*cmd, "--resume_from_checkpoint", "latest"], out + ".log", what)
    atomic_write_json(os.path.join(out, "train_time.json"), {"seconds": time.time() - start})


def train_seconds(out: str) -> float:
    return json.load(open(os.path.join(out, "train_time.json")))["seconds"]


# ``run_all``'s jobs are threads of one process, and diffusers' ``from_pretrained`` and peft's ``load_lora_weights``
# build modules under process-wide meta-device patches: a model another thread builds meanwhile comes out empty or
# fails. Jobs that load models in-process (their evaluation) hold this lock while loading.
MODEL_LOAD_LOCK = threading.Lock()


def run_all(job: Callable[..., dict], jobs: list[tuple], parallel: int) -> list[dict]:
    """``job(*args)`` for every tuple in ``jobs``, ``parallel`` at a time (threads: each job waits on a child)."""
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(lambda args: job(*args), jobs))


def run_seed(name: str, arm: str) -> int | None:
    """The seed of a run folder named ``<arm>-seed<N>``; None for another arm's (or any other) name."""
    seed = name[len(arm) + len("-seed"):]
    return int(seed) if name.startswith(f"{arm}-seed") and seed.isdigit() else None


def collect_results(output_dir: str, arms: Iterable[str], result_file: str,
                    defaults: dict | None = None) -> tuple[dict[str, dict[int, dict]], dict]:
    """Every finished run under ``output_dir/runs`` (those holding ``result_file``) as {arm: {seed: result}}
    in ``arms`` order, and the settings they share (a run made with other settings is refused)."""
    results: dict[str, dict[int, dict]] = {}
    settings: dict | None = None
    runs = os.path.join(output_dir, "runs")
    names = sorted(os.listdir(runs)) if os.path.isdir(runs) else []
    for arm in arms:
        for name in names:
            path = os.path.join(runs, name, result_file)
            seed = run_seed(name, arm)
            if seed is None or not os.path.exists(path):
                continue
            settings_path = os.path.join(runs, name, "settings.json")
            if settings is None and os.path.exists(settings_path):
                settings = json.load(open(settings_path))
            check_run_settings(os.path.join(runs, name), settings or {}, defaults)  # refuses one without settings
            results.setdefault(arm, {})[seed] = json.load(open(path))
    if settings is None:
        raise ConfigError(f"No finished run in {runs}: nothing to summarize.")
    return results, settings
