"""The `phinano` command: generate and info (chat and serve live in their own modules, chat.py and server.py).

    phinano generate "def fibonacci(n):"                       # the shipped nano model
    phinano generate --model microsoft/Phi-3-mini-4k-instruct --chat "Why is the sky blue?"
    phinano info --model ./my-phi3-folder

Any PhinanoError (missing file, bad checkpoint, prompt too long, offline Hub) prints one line on stderr and
exits with status 1.
"""

from __future__ import annotations

import argparse
import sys

from . import DEFAULT_MODEL, PhinanoError
from .generate import speed_line


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"local folder, shipped nano model name, or Hub repo id (default: {DEFAULT_MODEL})")
    p.add_argument("--backend", choices=("numba", "numpy"), default="numba", help="kernel backend (default numba)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=None,
                   help="0 = greedy; default: the model's generation_config (greedy for released Phi models)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")


def sampling_options(args: argparse.Namespace, model=None) -> dict:
    """Sampling options from the flags; with no --temperature, the model's own generation_config defaults
    (Transformers' behaviour: greedy unless the checkpoint sets do_sample) fill in what was not given."""
    given = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                 repetition_penalty=args.repetition_penalty if args.repetition_penalty != 1.0 else None)
    defaults = getattr(model, "sampling_defaults", {}) if args.temperature is None else {}
    options = {k: (v if v is not None else defaults.get(k)) for k, v in given.items()}
    options["temperature"] = options["temperature"] or 0.0
    options["repetition_penalty"] = options["repetition_penalty"] or 1.0
    return {**options, "seed": args.seed}


def load_model(args: argparse.Namespace):
    import phinano

    return phinano.load(args.model, backend=args.backend, threads=args.threads, revision=args.revision)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import stream_text

    model = load_model(args)
    tok = model.tokenizer
    if tok is None:
        raise PhinanoError(f"{args.model}: no tokenizer.json in the model folder, cannot encode a text prompt")
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    else:
        ids = tok.encode(args.prompt)
        print(args.prompt, end="", flush=True)
    stats: dict = {}
    if getattr(args, "show_experts", False):  # one line per token: its text and its experts per layer
        from .tracing import print_expert_trace

        if not args.chat:
            print()  # end the echoed prompt's line
        print_expert_trace(model, ids, args.max_new_tokens, sampling_options(args, model), args.stop, stats)
    else:
        for piece in stream_text(model, ids, args.max_new_tokens, stop_strings=args.stop, stats=stats,
                                 **sampling_options(args, model)):
            print(piece, end="", flush=True)
        print()
    if args.verbose:
        print(speed_line(stats), file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    model = load_model(args)
    cfg, w = model.config, model.weights
    total, active = model.parameter_counts()
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # float32 K and V
    context = cfg.max_position_embeddings
    lines = [
        ("model", model.name),
        ("architecture", cfg.architecture),
        ("parameters", f"{total:,}" + (f" total, {active:,} active per token" if active != total else "")),
        ("layers", f"{cfg.num_hidden_layers} x (hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}, "
                   f"kv heads {cfg.num_key_value_heads}, head dim {cfg.head_dim}, mlp {cfg.intermediate_size})"),
        ("vocab", f"{cfg.vocab_size}"),
        ("rope", f"{cfg.rope_type}, theta {cfg.rope_theta:g}, rotary dims {cfg.rotary_dim} of {cfg.head_dim}"
                 + (f", original length {cfg.original_max_position_embeddings}" if cfg.rope_type == "longrope" else "")),
        ("context", f"{context} tokens" + (f", sliding window {cfg.sliding_window}" if cfg.sliding_window else "")),
        ("dtype on disk", w.dtype),
        ("weights", f"{w.nbytes / 1e9:.3f} GB, memory-mapped"),
        ("kv cache", f"{kv_per_token / 1e6:.3f} MB per token (float32), {kv_per_token * context / 1e9:.2f} GB "
                     f"at the full {context}-token context"),
        ("memory needed", f"about {(w.nbytes + kv_per_token * min(context, 4096)) / 1e9:.2f} GB for a "
                          f"{min(context, 4096)}-token generation"),
        ("stop tokens", ", ".join(str(t) for t in model.stop_token_ids) or "none"),
        ("backend", model.backend),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import Chat, repl

    model = load_model(args)
    chat = Chat(model, system=args.system, max_new_tokens=args.max_new_tokens,
                sampling=sampling_options(args, model), stop_strings=args.stop)
    return repl(chat, sys.stdin, sys.stdout, sys.stderr, speed_line if args.verbose else None)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import bind, check_extra, serve, served_name

    check_extra()  # before loading a model: a missing extra or a port in use is a one-line error
    sock = bind(args.host, args.port)
    model = load_model(args)
    serve(model, args.name or served_name(args.model), sock, args.max_queue, args.max_request_bytes, args.threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phinano", description="Phi-3 family inference in NumPy + Numba")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt (or answer it with --chat), streaming to stdout")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--show-experts", action="store_true",
                   help="PhiMoE: print each generated token with the experts it was routed to per layer")
    g.add_argument("--verbose", "-v", action="store_true", help="print a speed report on stderr")
    g.add_argument("prompt")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="architecture, parameter count, dtype, memory")
    add_model_args(i)
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("chat", help="interactive chat in the terminal (/reset, /system TEXT, /exit)")
    add_model_args(c)
    add_sampling_args(c)
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--verbose", "-v", action="store_true", help="print a speed report after each answer")
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI- and Ollama-compatible HTTP server (needs phinano[serve])")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", default=None, help="model name clients send (default: the folder's name or --model)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond this get a 503")
    s.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024, help="larger bodies get a 413")
    s.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PhinanoError as e:
        print(f"phinano: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `phinano generate ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
