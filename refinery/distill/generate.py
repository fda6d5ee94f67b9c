"""The `generate` stage: the teacher writes task-specific Alpaca data by self-instruct.

    refinery generate configs/quickstart.yaml [generate.engine=hf ...]

Per task: seed items from the task's *seed* split (never the held-out split) -> the teacher
lists sub-topics near each seed -> writes question/answer pairs per sub-topic, prompted with
solved seed items -> parsed (malformed dropped) -> deduplicated against each other, the seed
items and the held-out items (near-duplicates too) -> the teacher rates each pair 1-10
(expected value of its next-token distribution) -> pairs under `score_threshold` dropped.

Dedupe runs before rating only to spare the teacher work; every candidate gets exactly one
reason, so per task: generated = malformed + duplicate + held_out + low_score + kept.

Seed answers (`include_seed_answers`): each seed question also becomes a row, answered with
the choice the teacher finds most likely in the evaluation's own cloze format. They are the
most in-distribution rows we can make without touching held-out items, they cost one scoring
pass and no generation, and a 135M teacher's free-form pairs are noisy, so they anchor the
student on the exact question/answer shape it is evaluated on.

Writes `<run_dir>/generate/data.jsonl` ({instruction, input, output, task, score}) and
`rejected.jsonl` (every dropped candidate with its reason). Deterministic given the seed.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from refinery.core import tasks as core_tasks
from refinery.core.config import ConfigError
from refinery.core.manifest import write_jsonl
from refinery.core.models import resolve_models
from refinery.core.stage import Context, Result
from refinery.distill import selfinstruct as si
from refinery.distill.config import GenerateConfig

log = logging.getLogger("refinery.distill")

REASONS = ("malformed", "duplicate", "held_out", "low_score")


@dataclass
class TaskPlan:
    """One task's seeds: the items shown to the teacher and its one-line description."""

    name: str
    description: str
    seeds: list[core_tasks.Item]
    pool: list[core_tasks.Item]
    """The task's whole seed split (few-shot examples are drawn from it)."""
    task: core_tasks.Task | None = None


@dataclass
class Candidate:
    task: str
    origin: str
    """`pair` (self-instruct) or `seed_answer` (a seed question with the teacher's chosen answer)."""
    question: str = ""
    answer: str = ""
    raw: str = ""
    anchors: list[si.Example] = field(default_factory=list)
    reason: str = ""
    score: float | None = None
    item: core_tasks.Item | None = None
    """For seed answers: the seed item (its layout is the row's prompt when the task has its own)."""


def seed_items(task: core_tasks.Task, k: int, seed: int) -> tuple[list, list]:
    """(k seed items sampled from the task's seed split, the whole seed split)."""
    pool = list(task.seed)
    return random.Random(f"{seed}:{task.name}").sample(pool, min(k, len(pool))), pool


def held_out_index(tasks: list[core_tasks.Task], threshold: float) -> si.NearDupIndex:
    """Index of every held-out question of the run's tasks (generated rows must not match)."""
    idx = si.NearDupIndex(threshold)
    for task in tasks:
        for item in task.held:
            idx.add(item.question)
            if item.prompt is not None:  # an lm-eval layout: also its question without the scaffolding
                idx.add(_core(item.question))
    return idx


def _core(text: str) -> str:
    """A rendered prompt without a leading `Question:`/`Q:` and a trailing `Answer:`/`A:` line."""
    lines = text.strip().split("\n")
    if len(lines) > 1 and lines[-1].strip().rstrip(":").lower() in ("answer", "a"):
        lines = lines[:-1]
    first = lines[0]
    for tag in ("Question:", "Q:"):
        if first.startswith(tag):
            lines[0] = first[len(tag):].strip()
    return "\n".join(lines)


def _subtopics(engine, plans: list[TaskPlan], cfg: GenerateConfig, seed: int) -> list[tuple[TaskPlan, str, object]]:
    """(plan, topic, seed example) triples; the task description stands in when nothing parses."""
    jobs = []
    for plan in plans:
        examples = [si.example_of(it) for it in plan.seeds] or [None] * cfg.seeds_per_task
        jobs += [(plan, ex) for ex in examples]
    replies = engine.generate([engine.chat(*si.subtopic_request(p.description, ex, cfg.subtopics_per_seed))
                               for p, ex in jobs], max_new_tokens=min(cfg.max_new_tokens, 16 * cfg.subtopics_per_seed + 16),
                              temperature=cfg.temperature, top_p=cfg.top_p, seed=seed * 10 + 1)
    out, empty = [], 0
    for (plan, ex), reply in zip(jobs, replies):
        topics = si.parse_subtopics("1." + reply, cfg.subtopics_per_seed)
        if not topics:
            empty += 1
            topics = [plan.description]
        out += [(plan, t, ex) for t in topics]
    log.info("sub-topics: %d from %d seed prompts (%d replies unparseable)", len(out), len(jobs), empty)
    return out


def _pairs(engine, topics, cfg: GenerateConfig, seed: int) -> list[Candidate]:
    rng = random.Random(seed)
    jobs = []
    for plan, topic, ex in topics:
        for _ in range(cfg.pairs_per_subtopic):
            others = [si.example_of(it) for it in rng.sample(plan.pool, min(cfg.shots, len(plan.pool)))]
            shots = ([ex] if ex else []) + [o for o in others if not ex or o.question != ex.question]
            jobs.append((plan, shots[:cfg.shots], si.pair_request(plan.description, topic, shots[:cfg.shots])))
    replies = engine.generate([engine.chat(*req) for _, _, req in jobs], max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, top_p=cfg.top_p, seed=seed * 10 + 2)
    cands = []
    for (plan, shots, _), reply in zip(jobs, replies):
        parsed = si.parse_pair(reply)
        c = Candidate(plan.name, "pair", raw=reply, anchors=shots[:2])
        if parsed is None:
            c.reason = "malformed"
        else:
            c.question, c.answer = parsed
        cands.append(c)
    return cands


def _seed_answers(engine, plans: list[TaskPlan], max_new_tokens: int) -> list[Candidate]:
    """Each seed question answered by the teacher in the evaluation's own layout (`Item.context`):
    multiple choice, the choice it finds most likely; generative, its greedy answer."""
    cands = []
    by_choices: dict[tuple, list] = {}
    gen = []
    for plan in plans:
        for it in plan.seeds:
            if it.choices:
                by_choices.setdefault((it.choices, it.delimiter), []).append((plan, it))
            else:
                gen.append((plan, it))

    def add(plan, it, answer):
        cands.append(Candidate(plan.name, "seed_answer", it.question, answer, item=it, reason="" if answer else "malformed",
                               anchors=[si.example_of(x) for x in plan.seeds if x is not it][:2]))

    for (choices, delim), group in by_choices.items():  # one scoring call per distinct choice list
        lps = engine.score_choices([it.context() for _, it in group], [delim + c for c in choices])
        for (plan, it), row in zip(group, lps):
            add(plan, it, choices[max(range(len(choices)), key=row.__getitem__)].strip())
    if gen:
        limit = max(p.task.max_new_tokens if p.task else max_new_tokens for p, _ in gen)
        replies = engine.generate([it.context() for _, it in gen], max_new_tokens=limit, temperature=0.0,
                                  top_p=1.0, seed=0)
        for (plan, it), reply in zip(gen, replies):
            add(plan, it, _first_answer(reply, plan.task.until if plan.task else ("\n",)))
    order = {p.name: i for i, p in enumerate(plans)}
    return sorted(cands, key=lambda c: order[c.task])  # stable: task order, then seed order


def _first_answer(reply: str, until: tuple[str, ...]) -> str:
    """The reply up to the first stop string, trimmed (an empty answer is rejected as malformed)."""
    for stop in until:
        if stop and stop in reply:
            reply = reply[:reply.index(stop)]
    return reply.strip()


def _dedupe(cands: list[Candidate], plans: list[TaskPlan], held: si.NearDupIndex, threshold: float) -> None:
    """Mark held-out matches and (near-)duplicates of each other or of a seed-split item.

    Seed answers come first and are the only rows allowed to repeat a seed-split question;
    a pair that copies one (say, a few-shot example) adds nothing new and counts as a duplicate.
    """
    seen, shown = si.NearDupIndex(threshold), si.NearDupIndex(threshold)
    for plan in plans:
        for it in plan.pool:
            shown.add(it.question)
    for c in cands:
        if c.reason:
            continue
        if held.find(c.question):
            c.reason = "held_out"
        elif seen.find(c.question) or (c.origin == "pair" and shown.find(c.question)):
            c.reason = "duplicate"
        else:
            seen.add(c.question)


def _score(engine, cands: list[Candidate], threshold: float) -> None:
    """Teacher's expected 1-10 rating of each surviving candidate; low ones marked."""
    alive = [c for c in cands if not c.reason]
    prompts = [engine.chat(*si.rating_request(c.question, c.answer, c.anchors)) for c in alive]
    lps = engine.score_choices(prompts, si.RATINGS) if alive else []
    apply_scores(alive, [si.expected_rating(row) for row in lps], threshold)


def apply_scores(cands: list[Candidate], scores: list[float], threshold: float) -> None:
    """Attach scores; a candidate scored below `threshold` is rejected as `low_score`."""
    if len(cands) != len(scores):
        raise ValueError(f"{len(scores)} scores for {len(cands)} candidates")
    for c, score in zip(cands, scores):
        c.score = round(score, 3)
        if c.score < threshold:
            c.reason = "low_score"


def _metrics(cands: list[Candidate], plans: list[TaskPlan], engine) -> dict:
    per_task = {}
    for plan in plans:
        mine = [c for c in cands if c.task == plan.name]
        counts = {"generated": len(mine), "seed_answers": sum(c.origin == "seed_answer" for c in mine)}
        counts.update({r: sum(c.reason == r for c in mine) for r in REASONS})
        counts["kept"] = sum(not c.reason for c in mine)
        per_task[plan.name] = counts
    kept = [c.score for c in cands if not c.reason]
    scored = [c.score for c in cands if c.score is not None]
    totals = {k: sum(t[k] for t in per_task.values()) for k in ("generated", "kept", *REASONS)}
    return {"engine": engine.name, "rows": totals["kept"], "totals": totals, "per_task": per_task,
            "mean_score": round(sum(kept) / len(kept), 3) if kept else None,
            "mean_score_all": round(sum(scored) / len(scored), 3) if scored else None,
            "tokens_generated": engine.tokens_generated, "generate_s": round(engine.generate_seconds, 2),
            "tokens_per_s": round(engine.tokens_per_second, 1)}


def _rows(cands: list[Candidate]) -> tuple[list[dict], list[dict]]:
    kept = [{"instruction": c.question, "input": "", "output": c.answer, "task": c.task, "score": c.score,
             **_layout(c)} for c in cands if not c.reason]
    rejected = [{"task": c.task, "origin": c.origin, "reason": c.reason, "instruction": c.question,
                 "output": c.answer, "score": c.score, **({"raw": c.raw} if c.reason == "malformed" else {})}
                for c in cands if c.reason]
    return kept, rejected


def _layout(c: Candidate) -> dict:
    """A seed answer of a task with its own layout keeps that exact context (see prompts.example_text)."""
    if c.item is None or c.item.prompt is None:
        return {}
    return {"prompt": c.item.prompt, **({"delimiter": c.item.delimiter} if c.item.delimiter != " " else {})}


def run(ctx: Context, cfg: GenerateConfig) -> Result:
    """Generate `<run_dir>/generate/data.jsonl` (+ rejected.jsonl) with the teacher; see the module doc."""
    from refinery.distill.engines import make_engine

    out = ctx.stage_dir("generate")
    teacher, _ = resolve_models(ctx.models)
    tasks = [core_tasks.load_task(ctx.tasks, name) for name in ctx.tasks.names]
    plans = []
    for task in tasks:
        seeds, pool = seed_items(task, cfg.seeds_per_task, ctx.seed)
        plans.append(TaskPlan(task.name, task.description, seeds, pool, task))
    held = held_out_index(tasks, cfg.dedupe_threshold)
    engine = make_engine(cfg.engine, teacher, cfg.dtype, ctx.models.trust_remote_code, cfg.batch_size)
    try:
        cands = _seed_answers(engine, plans, cfg.max_new_tokens) if cfg.include_seed_answers else []
        cands += _pairs(engine, _subtopics(engine, plans, cfg, ctx.seed), cfg, ctx.seed)
        _dedupe(cands, plans, held, cfg.dedupe_threshold)
        _score(engine, cands, cfg.score_threshold)
        metrics = _metrics(cands, plans, engine)
    finally:
        engine.close()
    kept, rejected = _rows(cands)
    write_jsonl(out / "rejected.jsonl", rejected)
    _log_table(metrics)
    if not kept:
        raise ConfigError(f"generate: none of {len(cands)} candidates survived (see {out / 'rejected.jsonl'}; "
                          f"mean teacher score {metrics['mean_score_all']}): lower generate.score_threshold "
                          f"(now {cfg.score_threshold}) or raise generate.seeds_per_task")
    write_jsonl(out / "data.jsonl", kept)
    metrics["score_threshold"] = cfg.score_threshold
    return Result(metrics=metrics, outputs=["data.jsonl", "rejected.jsonl"])


def _log_table(m: dict) -> None:
    cols = ("generated", "malformed", "duplicate", "held_out", "low_score", "kept")
    lines = [f"{'task':<20}" + "".join(f"{c:>10}" for c in cols)]
    for task, counts in m["per_task"].items():
        lines.append(f"{task:<20}" + "".join(f"{counts[c]:>10}" for c in cols))
    lines.append(f"{'total':<20}" + "".join(f"{m['totals'][c]:>10}" for c in cols))
    log.info("generate (%s engine, %d tokens at %.1f tok/s, mean kept score %s):\n%s", m["engine"],
             m["tokens_generated"], m["tokens_per_s"], m["mean_score"], "\n".join(lines))
