"""The run directory: its checkpoints, metrics, args and output paths (its lock: lock.py), and the rules that keep a
run from being lost, stuck or silently changed.

A directory is empty (start), started (a run without a checkpoint yet: start it again, its old rows moved aside),
resumable (a run with a checkpoint), or foreign (not a tcod run: refused, never written into). Every file is
written through a temp file and a rename, so a kill at any moment leaves the last complete version.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import warnings

import torch

import lora
import memory
from lock import acquire_lock

# --------------------------------------------------------------------------------------------------
# Checkpoints: written to a temp dir and renamed, so a kill at any moment leaves the last complete one.


def nonfinite(student, optimizer) -> str | None:
    """The first weight or optimizer-state tensor holding a NaN or inf, by name; None when all are finite."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # --fsdp: this rank's shard (fsdp.nonfinite)
    for name, p in student.named_parameters():
        if not torch.isfinite(local(p)).all():
            return f"weight {name}"
    for i, state in enumerate(optimizer.state.values()):
        for key, v in state.items():
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(local(v)).all():
                return f"optimizer state {key} of parameter {i}"
    return None


def disk_full(e: BaseException) -> bool:
    """torch.save reports a full disk as a RuntimeError ('unexpected pos', 'file write failed'), the rest as ENOSPC."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and any(m in str(e) for m in ("unexpected pos", "file write failed", "No space left"))


def save_checkpoint(out: str, student, tok, optimizer, curriculum, step: int, bad_in_a_row: int = 0, buffer: dict | None = None) -> None:
    """buffer: the update buffer's state (buffer.TurnBuffer.state_dict), rows waiting for their optimizer step."""
    final, tmp, old = (os.path.join(out, n) for n in ("ckpt", "ckpt.tmp", "ckpt.old"))
    bad = nonfinite(student, optimizer)
    if bad:  # resuming from it would only crash or train on NaN: keep the last good checkpoint instead
        raise RuntimeError(f"not saving the step-{step} checkpoint: {bad} is not finite (lower --lr?); {out} keeps the last good one")
    shutil.rmtree(tmp, ignore_errors=True)
    memory.check_disk(out, memory.saved_bytes(student, optimizer))  # the old checkpoint stays until the new one is whole
    try:
        lora.save_model(student, tmp)  # a LoRA student: its adapter only
        tok.save_pretrained(tmp)
        state = {"optimizer": optimizer.state_dict(), "curriculum": curriculum.state_dict(), "step": step, "bad_in_a_row": bad_in_a_row}
        torch.save(state | ({"buffer": buffer} if buffer is not None else {}), os.path.join(tmp, "trainer.pt"))
        if os.path.isfile(os.path.join(out, "args.json")):  # a copy: a damaged args.json does not lose the run
            shutil.copy(os.path.join(out, "args.json"), tmp)
    except (OSError, RuntimeError) as e:
        if not disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(errno.ENOSPC, f"the disk is full: writing the step-{step} checkpoint to {tmp} failed ({e}); the last "
                      f"complete checkpoint in {out} is intact: free some space, then resume with --resume --out {out}") from e
    follow_umask(tmp)
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def follow_umask(path: str) -> None:
    """Give a written directory the modes the user's umask asks for: some writers (safetensors through a temp file)
    make 0600 files, which the user's group could not read under umask 022."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def last_checkpoint(out: str) -> str | None:
    for name in ("ckpt", "ckpt.old"):  # ckpt.old survives only a kill between the two renames
        if os.path.isfile(os.path.join(out, name, "trainer.pt")):
            return os.path.join(out, name)
    return None


def file_problem(path: str) -> str | None:
    """What makes one checkpoint file unusable, found without loading it: JSON that does not parse, a safetensors
    file shorter than its header says, a torch file (trainer.pt, *.bin) that is not a whole archive; None if sound."""
    try:
        if path.endswith(".json"):
            with open(path) as f:
                json.load(f)
        elif path.endswith(".safetensors"):
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if 8 + n > size:
                    return "cut short (its header is incomplete)"
                header = json.loads(f.read(n))
            end = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if end != size:
                return f"cut short ({size} bytes where its header describes {end})"
        elif path.endswith((".pt", ".bin")):
            torch.load(path, mmap=True, weights_only=False, map_location="cpu")
    except Exception as e:  # whatever the reader's complaint, the file cannot be used
        return f"unreadable ({type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})"
    return None


def checkpoint_problem(ckpt: str) -> str | None:
    """What is damaged in a checkpoint directory (checked before any model loads), or None."""
    names = sorted(os.listdir(ckpt))
    if "trainer.pt" not in names:
        return "trainer.pt is missing"
    if not any(n.endswith((".safetensors", ".bin", ".distcp")) for n in names):
        return "it holds no weights"
    if ".metadata" in names:  # a --fsdp run's: every rank's shard file, whole
        import fsdp

        if problem := fsdp.checkpoint_problem(ckpt):
            return problem
    for name in names:
        if problem := file_problem(os.path.join(ckpt, name)):
            return f"{name} is {problem}"
        if name.endswith(".index.json"):  # a sharded model: every shard its index names must be there
            with open(os.path.join(ckpt, name)) as f:
                shards = set(json.load(f).get("weight_map", {}).values())
            if lost := sorted(s for s in shards if s not in names):
                return f"{lost[0]}, a shard {name} names, is missing"
    return None


def usable_checkpoint(out: str) -> str:
    """The checkpoint to continue from: ckpt, or ckpt.old when ckpt is damaged (a warning says so); when neither is
    whole, an error naming the damage and the command that starts the run again."""
    damaged = []
    for name in ("ckpt", "ckpt.old"):
        path = os.path.join(out, name)
        if not os.path.isdir(path):
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            if damaged:
                warnings.warn(f"{damaged[0]}: continuing from {path} (step {checkpoint_step(path)}) instead")
            return path
        damaged.append((path, problem))
    if not damaged:
        raise FileNotFoundError(f"{out} holds no checkpoint")
    q = shlex.quote  # a command to paste: a path with spaces stays one word
    moves = " && ".join(f"mv {q(p)} {q(p + '.damaged')}" for p, _ in damaged)
    raise ValueError("; ".join(f"{p} is damaged: {why}" for p, why in damaged) + ". No whole checkpoint is left: to "
                     f"start the run again from step 0 (its files kept as *.old): {moves} && python tcod.py --resume --out {q(out)}")


def checkpoint_step(ckpt: str) -> int:
    """The step a checkpoint holds, read without its tensors (memory-mapped): cheap at any model size."""
    return torch.load(os.path.join(ckpt, "trainer.pt"), mmap=True, weights_only=False, map_location="cpu")["step"]


def append_metrics(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def keep_rows_before(path: str, step: int) -> None:
    """Rows of steps >= step will run again: drop them, through a new file and a rename (a crash keeps the old file).
    Damaged lines are dropped too, the whole old file kept beside it."""
    rows, damaged = read_jsonl(path, ("step",)) if os.path.exists(path) else ([], [])
    if damaged:
        shutil.copy(path, f"{path}.{time.strftime('%Y%m%d-%H%M%S')}.damaged")
        warnings.warn(f"{path}: damaged line{'s' * (len(damaged) > 1)} {damaged[:5]} dropped (the whole file is kept as "
                      f"{path}.*.damaged)")
    rows = [r for r in rows if r["step"] < step]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def read_jsonl(path: str, required: tuple[str, ...] = ()) -> tuple[list[dict], list[int]]:
    """(rows, damaged line numbers) of a file written one fsynced JSON object per line. A torn last line (a kill
    mid-write) is dropped silently; any other line that is not an object holding `required` is damaged."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows, damaged = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and all(k in row for k in required):
            rows.append(row)
        elif i < len(lines):  # the last piece, with no newline after it, is a torn write: not damage
            damaged.append(i)
    return rows, damaged


def read_metrics(path: str) -> list[dict]:
    """A run's metrics rows; damaged lines are skipped, and named in a warning."""
    if not os.path.exists(path):
        return []
    rows, damaged = read_jsonl(path, ("step",))
    if damaged:
        warnings.warn(f"{path}: line{'s' * (len(damaged) > 1)} {', '.join(map(str, damaged[:5]))} "
                      f"{'are' if len(damaged) > 1 else 'is'} damaged (not a metrics row) and skipped")
    return rows


# --------------------------------------------------------------------------------------------------
# The output directory: empty (start), started (no checkpoint yet: start again), resumable, or foreign (refused).
# tcod only ever deletes or replaces files it wrote itself, in a directory whose args.json says it is a tcod run.

RUN_KEYS = ("env", "student", "teacher", "curriculum", "seed")  # an args.json holding these was written by tcod
# Flags that may change on --resume: they change where and how fast the run goes, not what it computes (micro_batch
# only regroups the same sum of per-token losses, which moves the float result in the last bits), or which steps
# are evaluated and saved. Every other difference would make a different experiment and is refused.
RESUME_FREE = ("steps", "device", "teacher_device", "env_workers", "env_timeout", "micro_batch", "gradient_checkpointing",
               "eval_every", "save_every", "max_bad_steps", "out", "transcript_every", "transcript_episodes", "dry_run",
               "track", "eval", "vllm_memory", "vllm_sleep", "force")
PER_INVOCATION = ("resume", "force", "dry_run")  # about this command only: never taken from a run's args.json


def unique_keys(pairs: list) -> dict:
    """json's object_pairs_hook for files a person may edit: a key given twice is an error, not the last one winning."""
    keys = [k for k, _ in pairs]
    if twice := sorted({k for k in keys if keys.count(k) > 1}):
        raise ValueError(f"the key{'s' * (len(twice) > 1)} {', '.join(map(repr, twice))} appear{'s' * (len(twice) == 1)} "
                         "more than once in one object (which one counts would be a guess)")
    return dict(pairs)


def read_args_file(path: str) -> tuple[dict | None, str | None]:
    """(the args tcod wrote in path, None) or (None, what is wrong with it); (None, None): a JSON file not tcod's."""
    try:
        with open(path) as f:
            data = json.load(f, object_pairs_hook=unique_keys)
    except ValueError as e:
        return None, f"not valid JSON: {e}"
    return (data if isinstance(data, dict) and all(k in data for k in RUN_KEYS) else None), None


def read_run_args(out: str) -> dict | None:
    """A run's args.json, or None when there is none or it is not one tcod wrote. A damaged one (cut short, garbled)
    in a directory that holds a run is replaced by the copy in its checkpoint, with a warning, or named in an error."""
    path = os.path.join(out, "args.json")
    if not os.path.isfile(path):
        return None
    data, problem = read_args_file(path)
    if problem is None:
        return data
    for name in ("ckpt", "ckpt.old"):
        copy = os.path.join(out, name, "args.json")
        if os.path.isfile(copy) and (saved := read_args_file(copy)[0]) is not None:
            warnings.warn(f"{path} is damaged ({problem}): using the copy saved with the checkpoint, {copy}")
            return saved
    if any(os.path.exists(os.path.join(out, n)) for n in ("ckpt", "ckpt.old", "metrics.jsonl")):
        raise ValueError(f"{path} is damaged ({problem}), and no checkpoint holds a copy of it (older versions kept "
                         f"none): restore it from a backup, then `python tcod.py --resume --out {shlex.quote(out)}` continues the run")
    return None  # not a run: someone's own file


def run_state(out: str) -> str:
    """'empty', 'started' (a run without a checkpoint), 'resumable' (a run with one) or 'foreign' (not a tcod run)."""
    if not os.path.exists(out):
        return "empty"
    if not os.path.isdir(out):
        return "foreign"
    if set(os.listdir(out)) <= {"lock"}:  # killed before it wrote its args.json
        return "empty"
    if read_run_args(out) is None:
        return "foreign"
    return "resumable" if last_checkpoint(out) else "started"


def start_mode(state: str, resume: bool, out: str) -> str:
    """What to do with the output directory: 'fresh', 'restart' (move the old rows aside, start at step 0) or 'resume'."""
    if state == "foreign":
        raise FileExistsError(f"{out} exists and is not a tcod run (no args.json of tcod's in it): tcod does not write "
                              "into it, so that no file of yours is overwritten; pass another --out (a new or empty directory)")
    if state == "empty":
        if resume:
            raise FileNotFoundError(f"--resume: no checkpoint in {out}, and no run either: start it without --resume")
        return "fresh"
    if state == "resumable" and not resume:
        raise FileExistsError(f"{out} already holds a run with a checkpoint: continue it with `python tcod.py --resume "
                              f"--out {out}` (add --steps N to run it longer), or pass another --out")
    return "resume" if state == "resumable" else "restart"


def resume_differences(old: dict, new: dict) -> tuple[list[str], dict]:
    """(refused, allowed): the differences between a run's args.json and the new arguments, by RESUME_FREE."""
    refused, allowed = [], {}
    for key, value in new.items():
        if key in PER_INVOCATION:
            continue
        value = json.loads(json.dumps(value))  # tuples as lists, as args.json holds them
        if key not in old or old[key] == value:  # a key the run's (older) args.json lacks cannot be compared
            continue
        if key in RESUME_FREE:
            allowed[key] = [old[key], value]
        else:
            refused.append(f"--{key.replace('_', '-')}: {old[key]!r} in the run, {value!r} now")
    return refused, allowed


def check_resume(old: dict, new: dict, out: str) -> dict:
    refused, allowed = resume_differences(old, new)
    if refused:
        raise ValueError(f"--resume would change the experiment of {out}: " + "; ".join(refused) + ". Resume with the "
                         "run's own values (omit those flags), or start a new run with another --out")
    return allowed


def check_weights(old: dict, weights: dict, out: str) -> None:
    """The models a resume loads must be the run's: their fingerprints (fingerprint.py) against args.json's record."""
    recorded = old.get("weights")
    if recorded is None:
        warnings.warn(f"{out}/args.json records no weight fingerprints (written by an older version): the "
                      f"{' and '.join(weights)} cannot be checked against the run's; this resume records them")
        return
    differ = [r for r in weights if recorded.get(r) and weights[r] and recorded[r] != weights[r]]
    if differ:
        raise ValueError(f"--resume: the weights of the {' and '.join(differ)} changed since {out} was started ("
                         + "; ".join(f"{old[r]}: {recorded[r]} in the run, {weights[r]} now" for r in differ)
                         + "): the run would go on with another model. Restore the run's weights, or start a new run with another --out")


def plan_start(out: str, resume: bool, new: dict, weights: dict) -> tuple[str, str | None, dict]:
    """Everything a start must know before it writes or loads anything: (mode, the checkpoint to continue from, the
    flags a resume changes). A resume that cannot start (other flags or weights, fewer steps than done, a damaged
    checkpoint) is refused here, so a failed resume leaves the run as it was; `weights` holds the fingerprints of the
    models the resume loads from their names."""
    mode = start_mode(run_state(out), resume, out)
    if not resume or mode == "fresh":
        return mode, None, {}
    old = read_run_args(out)
    changed = check_resume(old, new, out)
    missing = [k for k in new if k not in old and k not in PER_INVOCATION]
    if missing:
        warnings.warn(f"{out}/args.json has no {', '.join('--' + k.replace('_', '-') for k in missing)} (written by an older "
                      f"version): the run goes on with today's {'values' if len(missing) > 1 else 'value'} "
                      + ", ".join(f"{k}={new[k]!r}" for k in missing))
    if unknown := [k for k in old if k not in new and k != "weights"]:
        warnings.warn(f"{out}/args.json has {', '.join(unknown)}, which this version does not know (written by a newer "
                      "one?): the run goes on without them")
    if mode != "resume":
        return mode, None, changed
    ckpt = usable_checkpoint(out)  # a damaged one is named before anything loads
    if new["steps"] < (done := checkpoint_step(ckpt)):  # read without its tensors: cheap at any model size
        raise ValueError(f"--steps {new['steps']}: the checkpoint in {out} is already at step {done}; allowed: >= {done}")
    check_weights(old, weights, out)
    return mode, ckpt, changed


def take(out: str, mode: str, args_json: dict, force: bool, locks: list) -> None:
    """The lead process makes a checked directory (plan_start's mode) its run's: takes the lock (appended to `locks`,
    which the caller releases however the run ends), moves a restarted run's files aside, and for a run that starts
    writes an empty metrics file and args.json before the models load: a kill from then on leaves a 'started' run,
    which starts again."""
    locks.append(acquire_lock(out, force))
    if mode == "restart":  # started, never checkpointed: nothing to resume from, so start again at step 0
        moved = move_aside(out)
        print(f"{out}: a run that started but saved no checkpoint; starting it again from step 0"
              + (f" (its files moved to {', '.join(moved)})" if moved else ""), file=sys.stderr)
    if mode != "resume":
        open(os.path.join(out, "metrics.jsonl"), "w").close()
        write_json(os.path.join(out, "args.json"), args_json)


def resumed(out: str, step: int, changed: dict, args_json: dict) -> None:
    """A resume that loaded its checkpoint (at `step`) can start: only now does the run change. Rows past the
    checkpoint belong to steps that will run again: dropped, so each step appears once. Flags the resume changed
    (RESUME_FREE only) are recorded in resumes.jsonl, and args.json describes the run as it now goes on."""
    keep_rows_before(os.path.join(out, "metrics.jsonl"), step)
    if changed:
        with open(os.path.join(out, "resumes.jsonl"), "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "changed": changed}) + "\n")
        print(f"--resume: changed {changed} (recorded in {out}/resumes.jsonl)", file=sys.stderr)
    write_json(os.path.join(out, "args.json"), args_json)


def write_json(path: str, data) -> None:
    """Through a new file and a rename: a crash leaves the old file or the new one, never half of one."""
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2)
    os.replace(path + ".tmp", path)


def move_aside(out: str) -> list[str]:
    """Rename every file of a started run (metrics, args, transcripts, tracker files, plots: all but the lock and what
    was moved aside before) to <name>.<time>.old, kept, never deleted, so the run starts again in a clean directory
    and no new file overwrites or mixes with an old one; returns the new names."""
    stamp, moved = time.strftime("%Y%m%d-%H%M%S"), []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name != "lock" and not name.endswith((".old", ".damaged", ".tmp")):  # .tmp: half-written, replaced when next written
            os.replace(path, f"{path}.{stamp}.old")
            moved.append(f"{path}.{stamp}.old")
    return moved


# --------------------------------------------------------------------------------------------------
# Output paths: the one rule every writer follows (tcod.py's run directory, eval.py, sft.py baseline, lora.py merge)


def output_path(out: str, flag: str = "--out") -> str:
    """Any writer's output path, checked before anything is written or loaded: a non-empty path, not a file, on a
    filesystem this user can write to (a read-only one is named as such, not later taken for a full disk)."""
    if not out.strip():
        raise ValueError(f"{flag} {out!r}: an empty path; name a directory (or leave {flag} out for the default)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"{flag} {out!r} is a file, not a directory")
    where = memory.existing_dir(out)
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        why = {errno.EROFS: "is on a read-only filesystem", errno.EACCES: "is not writable by this user (permission denied)",
               errno.EPERM: "is not writable by this user (permission denied)"}.get(e.errno)
        if why is None:
            raise
        raise OSError(e.errno, f"{flag} {out!r}: {where} {why}; pass a {flag} where you can write") from None
    return out


def new_output_dir(out: str | None, default: str, flag: str = "--out") -> str:
    """The directory of a writer that makes something new (an evaluation, a fine-tuned or merged model): an explicit
    one must be new or empty, since any file in it may be someone's; the default gets -2, -3, ... when taken. Made at
    once, so a long job learns of a bad directory now rather than when it saves."""
    if out is None:
        out, n = default, 1
        while os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            n += 1
            out = f"{default}-{n}"
    output_path(out, flag)
    if os.path.isdir(out) and (held := sorted(os.listdir(out))):
        raise FileExistsError(f"{flag} {out!r} is not empty (it holds {', '.join(held[:4])}{', ...' * (len(held) > 4)}): "
                              f"nothing is written into a directory that holds files, so none is overwritten; pass another {flag}")
    os.makedirs(out, exist_ok=True)
    return out
