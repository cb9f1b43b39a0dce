"""One 8-trial study with 1 worker, then with 2 workers, on PostgreSQL: wall clock and trial bookkeeping.

    python -m benchmarks.scaleout [--server postgresql://postgres@127.0.0.1:5432] [--trials 8] [--repeats 1]

Each run is the user's command, ``python -m pipeline.tune method=group_wise tune.workers=N ...``, on a new
PostgreSQL database and a new MLflow store, tuning a random-init Llama (hidden 128, 2 layers; its 9
group_wise settings outnumber the 8 trials, so TPE samples, as in a real space larger than the budget).
The runs alternate (1, 2, 1, 2, ...) so that drift of a shared machine hits both alike. A third run
per repeat is the fault case: two workers started by hand (as on two machines), one SIGKILLed mid-trial
once a trial has finished; the other finishes the study (heartbeat 2 s, grace 6 s). Per run:

- wall_s: the command's wall clock (process start to exit, study creation included);
- finished / failed / retried / lost: trials COMPLETE or PRUNED / FAIL / re-run after a dead worker /
  left RUNNING or WAITING in Optuna, plus MLflow trial runs left RUNNING (must be 0);
- duplicates: trials that drew the setting of an earlier trial (they reuse its values, or, if the first
  was still running, run it again); ``across workers``: the earlier trial was another worker's.

Written to experiments/scaleout/README.md with the command, commit and host.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import psycopg

from pipeline import tracking
from pipeline.assets import embedded_model_dir
from pipeline.tune_storage import storage_url

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "experiments" / "scaleout" / "README.md"


def tiny_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def new_database(server: str) -> str:
    name = f"quantbench_scaleout_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=5) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


def drop_database(url: str) -> None:
    server, name = url.rsplit("/", 1)
    with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=5) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def one_run(workers: int, server: str, model: Path, work: Path, trials: int, kill: bool = False) -> dict:
    storage = new_database(server)
    mlflow_uri = f"sqlite:///{work / f'mlflow-{uuid.uuid4().hex[:6]}.db'}"
    overrides = [
        "method=group_wise",
        "model=hf",
        f"model.path={model}",
        "eval.tokens=1024",
        "eval.context=128",
        "eval.stride=128",
        "eval.kl_tokens=512",
        f"tune.n_trials={trials}",
        f"tune.workers={workers}",
        f"tune.storage={storage}",
        "tune.study_name=scaleout",
        f"tracking.uri={mlflow_uri}",
        f"tune.best_dir={work / 'tuned'}",
    ]
    env = {**os.environ, "QUANTBENCH_CACHE": str(work / "cache")}
    start = time.perf_counter()
    killed = kill_one_of_two(overrides, env, storage) if kill else None
    if not kill:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.tune", *overrides], cwd=REPO, env=env, capture_output=True
        )
        if done.returncode:
            raise SystemExit(f"tune.workers={workers} failed:\n{done.stderr.decode()[-3000:]}")
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name="scaleout", storage=storage_url(storage))
    fault = f"one killed in trial {killed}" if kill else "none"
    load = os.getloadavg()[1]  # the machine's load over the last 5 minutes: other jobs share the cores
    row = {"workers": workers, "fault": fault, "wall_s": wall, "load": load, **bookkeeping(study, mlflow_uri)}
    drop_database(storage)
    return row


def kill_one_of_two(overrides: list[str], env: dict, storage: str) -> int:
    """Start two workers by hand; SIGKILL the second in its first trial after a trial has finished; wait
    for the first to finish the study. Returns the number of the killed worker's trial."""
    overrides = [*overrides, "tune.workers=1", "tune.heartbeat_s=2", "tune.grace_period_s=6"]
    env = {**env, "OMP_NUM_THREADS": "1"}  # as tune.workers=2 gives them
    cmd = [sys.executable, "-m", "pipeline.tune", *overrides]
    survivor, victim = (subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.DEVNULL) for _ in range(2))
    url = storage_url(storage)
    try:
        while True:
            time.sleep(0.2)
            if victim.poll() is not None:
                raise SystemExit("the worker to kill finished before it was caught mid-trial")
            try:
                trials = optuna.load_study(study_name="scaleout", storage=url).get_trials(deepcopy=False)
            except KeyError:  # the study is not created yet
                continue
            running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
            mine = [t for t in running if t.user_attrs.get("worker", "").endswith(f":{victim.pid}")]
            if mine and any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
                victim.kill()
                break
    finally:
        victim.wait()
    if survivor.wait():
        raise SystemExit("the surviving worker failed")
    return mine[0].number


def bookkeeping(study: optuna.Study, mlflow_uri: str) -> dict:
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("tune")
    open_runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`tune.trial` != '' and attributes.status = 'RUNNING'"
    )
    first: dict = {}
    duplicates = across = 0
    for trial in trials:
        key = tuple(sorted(trial.params.items()))
        if key in first:
            duplicates += 1
            across += first[key].user_attrs.get("worker") != trial.user_attrs.get("worker")
        else:
            first[key] = trial
    return {
        "trials": len(trials),
        "finished": sum(t.state in (states.COMPLETE, states.PRUNED) for t in trials),
        "failed": sum(t.state == states.FAIL for t in trials),
        "retried": sum("failed_trial" in t.system_attrs for t in trials),
        "lost": sum(t.state in (states.RUNNING, states.WAITING) for t in trials) + len(open_runs),
        "duplicates": duplicates,
        "across": across,
        "ran": sum("duplicate_of" not in t.user_attrs for t in trials),
        "workers_seen": len({t.user_attrs.get("worker") for t in trials}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = tiny_model(work / "model")
        for repeat in range(args.repeats):
            for workers, kill in ((1, False), (2, False), (2, True)):
                row = {"repeat": repeat, **one_run(workers, args.server, model, work, args.trials, kill)}
                print(row, flush=True)
                rows.append(row)
    write(rows, args)


def write(rows: list[dict], args: argparse.Namespace) -> None:
    ratios = [two["wall_s"] / one["wall_s"] for one, two in zip(rows[::3], rows[1::3])]
    info = tracking.provenance()
    lines = [
        "# Scale-out: one study, 1 worker vs 2 workers on PostgreSQL",
        "",
        f"Command: `python -m benchmarks.scaleout --trials {args.trials} --repeats {args.repeats}` "
        f"(commit {info['git.commit'][:7]}{' +dirty' if info['git.dirty'] == 'True' else ''}; "
        f"host {info['host.processor']}, {info['host.cpu_count']} cores; PostgreSQL {server_version(args.server)}).",
        "",
        f"Each run: `python -m pipeline.tune method=group_wise tune.n_trials={args.trials}` on a new PostgreSQL",
        "database, a random-init Llama (hidden 128, 2 layers, 9 group_wise settings: TPE samples), 1024 tokens.",
        "`tune.workers=2` gives each worker half the cores (OMP_NUM_THREADS=1 here); 1 worker uses both. The",
        "fault run starts two workers by hand and SIGKILLs one mid-trial (heartbeat 2 s, grace 6 s).",
        "",
        "| run | workers | fault | wall s | load | trials | finished | failed | retried | lost | ran "
        "| duplicates (across) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [row["repeat"], row["workers"], row["fault"], f"{row['wall_s']:.1f}", f"{row['load']:.1f}"]
        cells += [row["trials"], row["finished"]]
        cells += [row["failed"], row["retried"], row["lost"], row["ran"], f"{row['duplicates']} ({row['across']})"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    spread = f" (min {min(ratios):.2f}, max {max(ratios):.2f}, {len(ratios)} pairs)" if len(ratios) > 1 else ""
    lines += [
        "",
        f"Wall-clock ratio, 2 workers / 1 worker: **{statistics.median(ratios):.2f}**{spread}, measured on a 2-core",
        "machine shared with other jobs at the time: two workers split the same two cores, so this is the cost",
        "of the coordination (study lock, shared storage, duplicate reuse) and of the second process start,",
        "not the speed-up of two machines.",
        "",
        "Columns: load = the machine's 5-minute load average at the end of the run (2 cores; other jobs ran);",
        "finished = COMPLETE or PRUNED; failed = FAIL; retried = re-runs of a dead worker's trial;",
        "lost = trials left RUNNING or WAITING plus MLflow trial runs left RUNNING; ran = trials that ran the",
        "pipeline (the rest reused the values of an earlier trial with the same setting); duplicates = trials",
        "that drew the setting of an earlier trial, (across) = of an earlier trial of the other worker.",
        "",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(OUT.read_text())


def server_version(server: str) -> str:
    with psycopg.connect(f"{server}/postgres", connect_timeout=5) as connection:
        return str(connection.execute("SHOW server_version").fetchone()[0])


if __name__ == "__main__":
    main()
