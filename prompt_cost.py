"""What the paper-style prompt costs in context: the token stream of one demonstrated episode, paper vs compact.

    python prompt_cost.py                                    # ALFWorld, WebShop, ScienceWorld: one episode each
    python prompt_cost.py --actions results/prompt-cost.json  # replay the actions of an earlier measurement

Each env plays its own demonstration on the first task of its first eval split, replies as bare `<action>`s (no
reasoning), think on as on the real benchmarks; both styles' messages are rendered by the real Qwen2.5 tokenizer's chat
template into one stream that ends at the last reply's eos, as rollout.py builds it. ScienceWorld's gold paths are
drawn at random, so the actions played are written to --out, and --actions replays a file's instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import tyro

import models
from envs import make_env
from prompts import STYLES, Prompter, format_reply


@dataclass
class Args:
    envs: tuple[str, ...] = ("alfworld", "webshop", "scienceworld")
    actions: str | None = None
    """a JSON file this script wrote: replay its tasks and actions instead of new demonstrations"""
    out: str = "prompt-cost.json"
    """where the rows (task, actions, tokens per style) go"""


def stream_tokens(tok, env, task: str, actions: list[str], style: str, think: bool = True) -> tuple[int, int]:
    """Tokens of the episode's stream (every user message and reply, up to the last reply's eos), and its turns."""
    step, prompter = env.reset(task), Prompter(style, env, think)
    messages = [{"role": "user", "content": prompter.first(step)}]
    for action in actions:
        messages.append({"role": "assistant", "content": format_reply(action)})
        step = env.step(action)
        if step.done:
            break
        messages.append({"role": "user", "content": prompter.after(action, step)})
    text = tok.apply_chat_template(messages, tokenize=False)
    text = text[: text.rindex(tok.eos_token) + len(tok.eos_token)]
    return len(tok(text, add_special_tokens=False)["input_ids"]), sum(m["role"] == "assistant" for m in messages)


def main(args: Args) -> dict:
    tok, earlier = models.qwen_tokenizer("qwen2.5"), {}
    if args.actions:
        with open(args.actions) as f:
            earlier = json.load(f)
    rows = {}
    for name in args.envs:
        env = make_env(name)
        try:
            task = earlier[name]["task"] if name in earlier else env.tasks(env.eval_splits[0])[0]
            actions = earlier[name]["actions"] if name in earlier else env.demo(task)
            counted = {style: stream_tokens(tok, env, task, actions, style) for style in STYLES}
        finally:
            env.close()
        tokens, turns = {style: n for style, (n, _) in counted.items()}, counted["paper"][1]
        rows[name] = dict(task=task, actions=actions, turns=turns, tokens=tokens)
        print(f"{name:13s} {tokens['paper']:7,d} paper vs {tokens['compact']:6,d} compact tokens "
              f"({tokens['paper'] / tokens['compact']:.1f}x), {turns} turns, {task}", flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
