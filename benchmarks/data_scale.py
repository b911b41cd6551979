"""Throughput, peak memory and near-dup quality of the data stage on synthetic JSONL corpora.

    python benchmarks/data_scale.py [--sizes 10 100] [--label LABEL] [--workers N]
    python benchmarks/data_scale.py --sizes 100 1000 --label quiet   # the issue's 100 MB + 1 GB
    python benchmarks/data_scale.py --sizes 100 1000 3000 --label quiet  # + 3 GB (~12 GB of /tmp)

For each size (MB) it writes a corpus of unique 8-sentence documents plus a known share of
planted duplicates (5% exact copies with case/whitespace changes, 5% near copies with one word
replaced, word-5-shingle Jaccard ~0.92), then runs the real data stage (`prepare_data`: read,
normalise, filters, exact + near dedup, split, atomic publish into a fresh store) in a child
process. Reported: MB/s of JSONL (wall clock, and per CPU-second of the child and its workers,
which a loaded machine distorts less), peak RSS of the busiest process (`ru_maxrss` of the child and
its workers; the child's RSS right after its imports is reported too: prefect, pyarrow etc.
cost a fixed ~0.7 GB) and of the whole process tree (psutil, sampled every 0.1 s), and the exact and
near duplicates dropped vs planted (precision/recall); with two or more sizes, the peak RSS
growth per extra row between the two largest (flat memory: ~0 beyond the fixed working set).
Every doc carries an `id` that says what
it is, so the ids missing from the output are the rows dropped.

The machine is shared: the 1-minute load average before and after each run is recorded in
benchmarks/results/data_scale.json (results are appended under `--label`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results/data_scale.json"
EXACT_SHARE, NEAR_SHARE = 0.05, 0.05
CPU_BEFORE = [0.0]  # RUSAGE_CHILDREN accumulates over runs

CHILD = """
import json, resource, sys, time
from fasttrack.core.config_loader import load_config
from tasks.data import prepare_data
cfg = load_config(sys.argv[1])
floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
t0 = time.perf_counter()
ref = prepare_data(cfg)
print(json.dumps({"seconds": time.perf_counter() - t0, "uri": ref.uri, "rss_after_imports": floor}))
"""


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> dict[str, int]:
    """Unique random-word documents with planted exact and near duplicates of earlier docs."""
    rng = random.Random(seed)
    vocab = [f"{rng.choice('bcdfghklmnprstvz')}{rng.choice('aeiou')}{i:x}" for i in range(50_000)]
    counts = {"unique": 0, "exact": 0, "near": 0}
    docs: list[str] = []  # a bounded pool of earlier docs to copy from
    written, target = 0, int(megabytes * 1e6)
    with open(path, "w") as f:
        while written < target:
            r = rng.random()
            if docs and r < EXACT_SHARE:
                kind, text = "exact", rng.choice(docs).upper().replace(". ", ".  ")
            elif docs and r < EXACT_SHARE + NEAR_SHARE:
                words = rng.choice(docs).split(" ")
                words[rng.randrange(len(words))] = rng.choice(vocab) + "q"
                kind, text = "near", " ".join(words)
            else:
                sentences = (
                    " ".join(rng.choice(vocab) for _ in range(rng.randint(12, 20))).capitalize()
                    + "."
                    for _ in range(8)
                )
                kind, text = "unique", " ".join(sentences)
                if len(docs) < 2000:
                    docs.append(text)
                else:
                    docs[rng.randrange(len(docs))] = text
            line = json.dumps({"text": text, "id": f"{kind}-{counts[kind]}"}) + "\n"
            counts[kind] += 1
            written += len(line)
            f.write(line)
    return counts


def write_config(path: Path, corpus: Path, store: Path, workers: int | None) -> None:
    data: dict = {"sources": [{"path": str(corpus), "format": "text"}], "clean": {"min_chars": 20}}
    if workers is not None:
        data["workers"] = workers
    cfg = {"name": "data-scale", "store": str(store), "model": {"name_or_path": "scratch"},
           "data": data}  # fmt: skip
    path.write_text(json.dumps(cfg))


def run_stage(config: Path) -> tuple[dict, float, float, float]:
    """(child's JSON, peak RSS of one process in MB, peak RSS of the process tree in MB,
    CPU seconds of the process tree: the forkserver workers are not waited-for children, so
    their CPU time is sampled with psutil, as their RSS is)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(config)], stdout=subprocess.PIPE, env=env, cwd=ROOT
    )
    peak_tree, done = 0.0, threading.Event()
    cpu: dict[int, float] = {}

    def sample() -> None:
        nonlocal peak_tree
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak_tree = max(peak_tree, sum(p.memory_info().rss for p in procs) / 1e6)
                for p in procs[1:]:
                    t = p.cpu_times()
                    cpu[p.pid] = max(cpu.get(p.pid, 0.0), t.user + t.system)
            except psutil.Error:
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out, _ = proc.communicate()
    finally:  # interrupted (SIGTERM from `timeout`): no orphaned stage, no corpus left in /tmp
        if proc.poll() is None:
            proc.kill()
    done.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"data stage failed (exit {proc.returncode})")
    use = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child and its waited-for workers
    child = json.loads(out.decode().strip().splitlines()[-1])
    child["cpu_seconds"] = use.ru_utime + use.ru_stime - CPU_BEFORE[0]
    CPU_BEFORE[0] = use.ru_utime + use.ru_stime
    child["cpu_seconds_tree"] = child["cpu_seconds"] + sum(cpu.values())
    return child, use.ru_maxrss / 1e3, peak_tree  # ru_maxrss: KiB on Linux


def dropped_ids(uri: str, planted: dict[str, int]) -> dict[str, int]:
    import pyarrow.parquet as pq

    kept: dict[str, int] = {k: 0 for k in planted}
    for part in Path(uri, "corpus").glob("*.parquet"):
        for doc_id in pq.read_table(part, columns=["id"]).column("id").to_pylist():
            kept[doc_id.split("-")[0]] += 1
    return {k: planted[k] - kept[k] for k in planted}


def measure(megabytes: float, workers: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="data-scale-") as tmp:
        tmp_path = Path(tmp)
        corpus = tmp_path / "corpus.jsonl"
        planted = make_corpus(corpus, megabytes)
        size_mb = corpus.stat().st_size / 1e6
        config = tmp_path / "run.json"
        write_config(config, corpus, tmp_path / "store", workers)
        load_before = os.getloadavg()[0]
        child, peak_one, peak_tree = run_stage(config)
        stats = json.loads(Path(child["uri"], "stats.json").read_text())["corpus"]
        gone = dropped_ids(child["uri"], planted)
    near_found = stats["dropped_near_duplicate"]
    # A planted near copy is found whether it was dropped as near or (after its source was)
    # not; unique docs dropped are false positives, attributed to whichever reason dropped them.
    near_true = min(gone["near"], near_found)
    return {
        "corpus_mb": round(size_mb, 1),
        "docs": sum(planted.values()),
        "workers": workers,
        "seconds": round(child["seconds"], 1),
        "mb_per_s": round(size_mb / child["seconds"], 2),
        "cpu_seconds": round(child["cpu_seconds"], 1),
        "mb_per_cpu_s": round(size_mb / child["cpu_seconds"], 2),
        "cpu_seconds_tree": round(child["cpu_seconds_tree"], 1),
        "mb_per_cpu_s_tree": round(size_mb / child["cpu_seconds_tree"], 2),
        "rss_mb_after_imports": round(child["rss_after_imports"]),
        "peak_rss_mb_one_process": round(peak_one),
        "peak_rss_mb_process_tree": round(peak_tree),
        "planted": planted,
        "dropped": {k: v for k, v in stats.items() if k.startswith("dropped_")},
        "unique_docs_dropped": gone["unique"],
        "exact_recall": round(
            min(gone["exact"], stats["dropped_exact_duplicate"]) / max(planted["exact"], 1), 4
        ),  # fmt: skip
        "near_precision": round(near_true / max(near_found, 1), 4),
        "near_recall": round(near_true / max(planted["near"], 1), 4),
        "load_avg_1min_before": round(load_before, 2),
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[10, 100])
    parser.add_argument("--label", default="current")
    parser.add_argument("--workers", type=int, default=None, help="data.workers (new code only)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the corpus on timeout
    runs: list[dict] = []
    for mb in args.sizes:
        run = measure(mb, args.workers)
        print(json.dumps(run), flush=True)
        runs.append(run)
        save(args.label, runs)  # after every size: a long run cut short keeps what finished


def save(label: str, runs: list[dict]) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[label] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs "
        "(see load averages)",
        "python": platform.python_version(),
        "runs": runs,
    }
    if len(runs) > 1:  # the two largest runs (both above 16 MB: the same worker pool)
        small, big = runs[-2], runs[-1]
        per_mb = [r["seconds"] / r["corpus_mb"] for r in (small, big)]
        rows = big["docs"] - small["docs"]
        results[label]["linearity"] = {
            "sizes_mb": [small["corpus_mb"], big["corpus_mb"]],
            "seconds_per_mb_ratio": round(per_mb[1] / per_mb[0], 2),  # goal: <= 2
            "peak_rss_bytes_per_extra_row_main_process": round(
                (big["peak_rss_mb_one_process"] - small["peak_rss_mb_one_process"]) * 1e6 / rows
            ),
            "peak_rss_bytes_per_extra_row_process_tree": round(
                (big["peak_rss_mb_process_tree"] - small["peak_rss_mb_process_tree"]) * 1e6 / rows
            ),
        }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
