"""moe-train-prepare throughput against Hugging Face `tokenizers`' own encode_batch, and the data
loader's time per step against the training step.

1. A generated corpus: JSONL and Parquet shards of documents cut from this machine's Python
   standard library source (about 256 MB; --quick: 2 MB), and a byte-level BPE of 8192 entries
   trained on a sample of it. Every run below uses that tokenizer.
2. Tokens/s of, in fresh processes: encode_batch over the same texts (read into memory first, not
   timed), with 1 thread (the reference) and with the library's own threads; then
   `moe-train-prepare --workers 1` and `--workers N` (reading, splitting, writing shards: end to
   end). The ratio to the 1-thread encoder is the figure: at N workers it should approach N.
   Checked in the same run: both prepare outputs are byte-identical, and their token count is
   the encoder's plus one end-of-document token per document. CPU seconds (all processes) are
   measured too: on a shared machine "cores it got" (CPU s / wall s) says how much of N workers
   the run could have, and tokens per CPU second stays comparable when wall time does not.
3. Loader vs step: the two prepared folders (workers 1 and N) as a 2-source mixture with epoch
   sampling (windows read across shards); the time to build one step's micro-batches (BatchPlan) against one training step
   (forward, backward, optimizer) at the default model size and at model=base (--quick: tiny).

    python benchmarks/prepare.py            # 256 MB corpus, workers 1 and os.cpu_count()
    python benchmarks/prepare.py --quick    # CI-sized
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_output_args,
    machine,
    machine_line,
    median,
    parse_args,
    print_table,
    publish,
)

REPO = Path(__file__).resolve().parents[1]
BPE_VOCAB = 8192


def stdlib_lines() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for p in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "site-packages" not in p.parts and "test" not in p.parts:
            try:
                lines += p.read_text(encoding="utf-8").splitlines(keepends=True)
            except (UnicodeDecodeError, OSError):
                pass
    return lines


def documents(lines: list[str], total_bytes: int, seed: int = 0):
    """Documents of 20-400 consecutive lines from random places, until total_bytes."""
    rng = random.Random(seed)
    made = 0
    while made < total_bytes:
        start = rng.randrange(len(lines))
        doc = "".join(lines[start : start + rng.randint(20, 400)])
        made += len(doc.encode())
        yield doc


def make_corpus(root: Path, total_bytes: int, n_files: int) -> dict:
    """n_files JSONL and n_files Parquet shards (half the bytes each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = stdlib_lines()
    per_file = total_bytes // (2 * n_files)
    docs = bytes_ = 0
    (root / "jsonl").mkdir(parents=True)
    (root / "parquet").mkdir()
    gen = documents(lines, total_bytes)
    for k in range(n_files):
        with open(root / "jsonl" / f"part-{k:03d}.jsonl", "w") as f:
            size = 0
            for i, text in enumerate(gen):
                f.write(json.dumps({"id": f"j{k}-{i}", "text": text}) + "\n")
                size += len(text.encode())
                docs, bytes_ = docs + 1, bytes_ + len(text.encode())
                if size >= per_file:
                    break
    for k in range(n_files):
        rows, size = [], 0
        for text in gen:
            rows.append({"id": f"p{k}-{len(rows)}", "text": text})
            size += len(text.encode())
            if size >= per_file:
                break
        docs, bytes_ = docs + len(rows), bytes_ + size
        pq.write_table(pa.Table.from_pylist(rows), root / "parquet" / f"part-{k:03d}.parquet",
                       row_group_size=2000)  # fmt: skip
    return {"documents": docs, "text_bytes": bytes_, "files": 2 * n_files}


def train_tokenizer(root: Path, sample_bytes: int) -> Path:
    from moe_train.data.tokenizers import train_bpe

    texts = list(documents(stdlib_lines(), sample_bytes, seed=1))
    train_bpe(texts, BPE_VOCAB).save(root / "tok")
    return root / "tok" / "tokenizer.json"


def reference_worker(corpus: Path, tokenizer: Path) -> None:
    """encode_batch over every text of the corpus (loaded first), timed; prints JSON."""
    import pyarrow.parquet as pq
    import tokenizers

    texts = []
    for p in sorted((corpus / "jsonl").glob("*.jsonl")):
        texts += [json.loads(line)["text"] for line in p.open()]
    for p in sorted((corpus / "parquet").glob("*.parquet")):
        texts += pq.read_table(p, columns=["text"]).column("text").to_pylist()
    tok = tokenizers.Tokenizer.from_file(str(tokenizer))
    batch, tokens = 1024, 0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), batch):
        tokens += sum(
            len(e.ids) for e in tok.encode_batch(texts[i : i + batch], add_special_tokens=False)
        )
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "tokens": tokens, "documents": len(texts)}))


def children_cpu_s() -> float:
    """CPU seconds (user + system) of every finished child process so far, theirs included."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_reference(corpus: Path, tokenizer: Path, threads: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env["TOKENIZERS_PARALLELISM"] = "false" if threads == "1" else "true"
    cmd = [sys.executable, __file__, "--reference-worker", str(corpus), str(tokenizer)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def run_prepare(corpus: Path, tokenizer: Path, out: Path, workers: int, shard_mb: int) -> dict:
    """moe-train-prepare end to end, in a fresh process (one core per worker)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "moe_train.data.prepare", str(corpus / "jsonl"),
           str(corpus / "parquet"), "--out", str(out), "--tokenizer", str(tokenizer),
           "--workers", str(workers), "--shard-mb", str(shard_mb), "--quiet"]  # fmt: skip
    t0, c0 = time.perf_counter(), children_cpu_s()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    seconds, cpu = time.perf_counter() - t0, children_cpu_s() - c0
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    meta = json.loads((out / "manifest.json").read_text())
    tokens = sum(meta["splits"][s]["tokens"] for s in ("train", "val"))
    docs = sum(meta["splits"][s]["documents"] for s in ("train", "val"))
    return {"seconds": seconds, "cpu_s": cpu, "tokens": tokens, "documents": docs,
            "shards": len(meta["splits"]["train"]["shards"])}  # fmt: skip


def startup_seconds() -> float:
    """What a fresh moe-train-prepare process spends importing (torch included), before work."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import moe_train.data.prepare"], env=env, check=True)
    return time.perf_counter() - t0


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def loader_vs_step(data_dirs: list[Path], model: str, steps: int, batch: int) -> dict:
    """Median ms to build a step's micro-batches vs median ms of a training step."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moe_train.config import CONFIG_DIR, register_configs
    from moe_train.parallel import ParallelState
    from moe_train.training.batches import BatchPlan
    from moe_train.training.build import build_engine, open_training_data
    from moe_train.training.step import train_step

    register_configs()
    mix = ",".join(f"{{path:{d},name:{d.name}}}" for d in data_dirs)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        dcfg = compose("train", overrides=[f"model={model}", f"data.mix=[{mix}]",
                                           "data.sampling=epoch", "trainer.precision=fp32",
                                           f"trainer.global_batch_size={batch}"])  # fmt: skip
    cfg = OmegaConf.to_object(dcfg)
    data = open_training_data(cfg)
    parallel = ParallelState(cfg.parallel)
    engine = build_engine(cfg, parallel, batch, 1)
    plan = BatchPlan(cfg.seed, batch, cfg.model.seq_len, batch, 1, 0, 1, parallel.device)
    loads, steps_s = [], []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        for _ in plan.micro_batches(data, step):
            pass
        loads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        train_step(engine, data, plan, step, 1e-4, rank=0)
        steps_s.append(time.perf_counter() - t0)
    load_ms, step_ms = 1e3 * median(loads[1:]), 1e3 * median(steps_s[1:])  # first: warm-up
    return {"model": model, "seq_len": cfg.model.seq_len, "global_batch": batch,
            "params": engine.module.num_params()["total"], "loader_ms": load_ms,
            "step_ms": step_ms, "loader_share": load_ms / step_ms, "steps": steps}  # fmt: skip


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_output_args(p, "2 MB corpus, tiny model (CI)")
    p.add_argument("--mb", type=int, default=256, help="corpus size in MB of text")
    p.add_argument("--files", type=int, default=8, help="JSONL files, and as many Parquet files")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="the N of --workers N")
    p.add_argument("--shard-mb", type=int, default=16, help="moe-train-prepare --shard-mb")
    p.add_argument(
        "--models", nargs="*", default=["small", "base"], help="loader vs step (none: skip)"
    )
    p.add_argument("--steps", type=int, default=3, help="timed training steps per model")
    p.add_argument(
        "--reference-worker", nargs=2, metavar=("CORPUS", "TOKENIZER"), help=argparse.SUPPRESS
    )
    a = parse_args(p, argv)
    if a.reference_worker:
        reference_worker(Path(a.reference_worker[0]), Path(a.reference_worker[1]))
        return None
    if a.quick:
        a.mb, a.files, a.shard_mb, a.models, a.steps = 2, 2, 1, ["tiny"], 2
    mach = machine()
    print(machine_line(mach))
    with tempfile.TemporaryDirectory(prefix="moe_prepare_bench_") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        corpus = make_corpus(tmp / "corpus", a.mb << 20, a.files)
        tokenizer = train_tokenizer(tmp, min(4 << 20, a.mb << 19))
        print(f"corpus: {corpus['documents']:,} documents, {corpus['text_bytes'] / 2**20:.0f} MiB "
              f"of text in {corpus['files']} files (JSONL + Parquet); BPE {BPE_VOCAB}; made in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        runs = {}
        for label, fn in (
            ("encode_batch, 1 thread", lambda: run_reference(tmp / "corpus", tokenizer, "1")),
            ("encode_batch, its own threads", lambda: run_reference(tmp / "corpus", tokenizer, "all")),
            ("moe-train-prepare --workers 1", lambda: run_prepare(tmp / "corpus", tokenizer, tmp / "w1", 1, a.shard_mb)),
            (f"moe-train-prepare --workers {a.workers}", lambda: run_prepare(tmp / "corpus", tokenizer, tmp / "wN", a.workers, a.shard_mb)),
        ):  # fmt: skip
            runs[label] = fn()
            print(
                f"  {label}: {runs[label]['tokens'] / runs[label]['seconds']:,.0f} tokens/s",
                flush=True,
            )
        identical = same_files(tmp / "w1", tmp / "wN")
        startup = startup_seconds()
        ref = runs["encode_batch, 1 thread"]
        w1 = runs["moe-train-prepare --workers 1"]
        counts_match = w1["tokens"] == ref["tokens"] + ref["documents"]
        rows, tokenize = [], []
        for label, r in runs.items():
            rate = r["tokens"] / r["seconds"]
            ratio = rate / (ref["tokens"] / ref["seconds"])
            per_cpu = r["tokens"] / r["cpu_s"]
            rows.append([label, f"{r['tokens']:,}", f"{r['seconds']:.1f}", f"{rate:,.0f}",
                         f"{ratio:.2f}", f"{r['cpu_s'] / r['seconds']:.2f}", f"{per_cpu:,.0f}"])  # fmt: skip
            tokenize.append({"run": label, **r, "tokens_per_s": rate, "vs_encode_1_thread": ratio,
                             "cores_used": r["cpu_s"] / r["seconds"], "tokens_per_cpu_s": per_cpu})  # fmt: skip
        print_table(["run", "tokens", "seconds", "tokens/s", "vs encode_batch 1 thread",
                     "cores it got", "tokens per CPU s"], rows)  # fmt: skip
        print(f"\nprepare is timed end to end, its process's start-up ({startup:.1f} s: Python and "
              f"torch imports) included; workers 1 and {a.workers} wrote identical files: "
              f"{identical}; prepare's tokens = encode_batch's + 1 per document: {counts_match}")  # fmt: skip
        loader = [loader_vs_step([tmp / "w1", tmp / "wN"], m, a.steps, 16 if m != "tiny" else 4)
                  for m in a.models]  # fmt: skip
        print_table(
            ["model", "seq_len", "batch", "params", "loader ms/step", "train ms/step", "loader share"],
            [[r["model"], r["seq_len"], r["global_batch"], f"{r['params'] / 1e6:.1f}M",
              f"{r['loader_ms']:.2f}", f"{r['step_ms']:.0f}", f"{100 * r['loader_share']:.3f}%"]
             for r in loader],
        )  # fmt: skip
    return publish(
        "prepare", mach,
        {"corpus": corpus, "bpe_vocab": BPE_VOCAB, "workers": a.workers, "shard_mb": a.shard_mb,
         "tokenize": tokenize, "prepare_startup_s": startup, "identical_outputs": identical,
         "token_counts_match": counts_match,
         "loader": loader},
        a.out,
    )  # fmt: skip


if __name__ == "__main__":
    main()
