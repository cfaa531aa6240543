"""The `phinano` command: generate, info, chat, serve and quantize. Each subcommand is a `cmd_*` function here;
the chat loop lives in chat.py, the server in serve/, GGUF writing in quantize.py.

    phinano generate "def fibonacci(n):"                       # the shipped nano model
    phinano generate --model microsoft/Phi-3-mini-4k-instruct --chat "Why is the sky blue?"
    phinano info --model ./my-phi3-folder

A flag out of range (`-t -1`, `--top-p 2`, `--threads 0`) prints one line on stderr and exits with status 2,
as argparse does for flags it cannot parse, before any model is loaded; the sampling flags are checked by
phinano.sampling, the rules the server applies too. Any other PhinanoError (missing file, bad checkpoint,
prompt too long, offline Hub) prints one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import DEFAULT_MODEL, PhinanoError
from .generate import speed_line
from .quantize import TYPES as QUANT_TYPES
from .sampling import SAMPLING_KEYS, OptionError, check_options, resolve_options

class FlagError(PhinanoError):
    """A flag's value is out of range: exit status 2, like argparse's own errors."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help="local folder, .gguf file, ollama:NAME[:TAG], shipped nano model name, or Hub repo id "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--backend", choices=("numba", "numpy"), default="numba", help="kernel backend (default numba)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads, 1 to the cores available (default: all)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--quantize", default=None, metavar="TYPE",
                   help="round a safetensors checkpoint to q8_0, q4_0, ... while loading (decodes faster)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=None,
                   help="0 = greedy; default: the model's generation_config.json (released Phi models: greedy; "
                        "the nano models: 0.8 with top-p 0.95)")
    p.add_argument("--top-k", type=int, default=None, help="0 = off")
    p.add_argument("--top-p", type=float, default=None, help="in (0, 1]; 1 = off")
    p.add_argument("--min-p", type=float, default=None, help="in [0, 1]; 0 = off")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 0; 1 = off")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    p.add_argument("--sampler-order", default=None, metavar="ORDER",
                   help="transformers (default: temperature first) or llama.cpp (temperature last); docs/sampling.md")
    p.add_argument("--prompt-lookup", type=int, default=None, metavar="K",
                   help="speculate: draft up to K tokens from the prompt per step, same output, faster on "
                        "input-grounded text")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    """The prompt: the last argument, or --prompt/-p TEXT (as `phinano diff` and llama.cpp spell it)."""
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (or give it with --prompt)")
    p.add_argument("--prompt", "-p", dest="prompt_flag", default=None, metavar="TEXT",
                   help="the prompt, as a flag instead of the last argument")


def cores_available() -> int:
    """The most kernel threads --threads may ask for: Numba's thread pool size (all cores this process may
    use, unless NUMBA_NUM_THREADS says otherwise)."""
    try:
        import numba

        return numba.config.NUMBA_NUM_THREADS
    except ImportError:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_flags(args: argparse.Namespace) -> None:
    """Refuse out-of-range flags before anything is loaded (FlagError naming the flag)."""
    if hasattr(args, "prompt_flag"):  # generate, trace: the prompt once, as the last argument or --prompt
        if (args.prompt is None) == (args.prompt_flag is None):
            raise FlagError("give the prompt once: as the last argument or with --prompt"
                            + (", not both" if args.prompt is not None else ""))
        args.prompt = args.prompt if args.prompt is not None else args.prompt_flag
    if getattr(args, "model", None) is not None and not args.model.strip():
        raise FlagError("--model: the model name is empty; give a model folder, a nano model name or a Hub repo id")
    if getattr(args, "threads", None) is not None:
        cores = cores_available()
        if not 1 <= args.threads <= cores:
            raise FlagError(f"--threads must be between 1 and {cores} (the cores available), got {args.threads}")
    if getattr(args, "quantize", None) is not None and args.quantize not in QUANT_TYPES:
        raise FlagError(f"--quantize must be one of {', '.join(QUANT_TYPES)}, got {args.quantize!r}")
    if hasattr(args, "port"):  # serve
        if not 0 <= args.port <= 65535:
            raise FlagError(f"--port must be between 0 and 65535 (0: any free port), got {args.port}")
        if args.max_queue < 1:
            raise FlagError(f"--max-queue must be at least 1, got {args.max_queue}")
        if args.max_batch < 1:
            raise FlagError(f"--max-batch must be at least 1, got {args.max_batch}")
        if args.max_request_bytes < 1:
            raise FlagError(f"--max-request-bytes must be at least 1, got {args.max_request_bytes}")
    if getattr(args, "out", None) is not None and args.command == "quantize":  # checked before minutes of work
        if args.out.suffix != ".gguf" or args.out.is_dir():
            raise FlagError(f"--out must name a .gguf file, got {str(args.out)!r}")
        folder = args.out.parent
        if not folder.is_dir():
            raise FlagError(f"--out: the folder {str(folder)!r} does not exist")
        if not os.access(folder, os.W_OK):
            raise FlagError(f"--out: the folder {str(folder)!r} cannot be written")
    if hasattr(args, "temperature"):  # generate and chat: the sampling flags, by phinano.sampling's rules
        try:
            resolve_options({key: getattr(args, key, None) for key in (*SAMPLING_KEYS, "max_new_tokens")})
        except OptionError as e:  # "top_p must be in (0, 1] ..." -> "--top-p must be in (0, 1] ..."
            raise FlagError(str(e).replace(e.param, "--" + e.param.replace("_", "-"), 1)) from None
        check_search_flags(args)


SEARCH_FLAGS = {"prompt_lookup_num_tokens": "--prompt-lookup", "num_beams": "--num-beams"}


def check_search_flags(args: argparse.Namespace) -> None:
    """--prompt-lookup and --num-beams by phinano.sampling's rules; beam search neither samples nor streams."""
    beams = getattr(args, "num_beams", None)
    try:
        check_options(prompt_lookup_num_tokens=getattr(args, "prompt_lookup", None),
                      num_beams=1 if beams is None else beams)
    except OptionError as e:
        raise FlagError(str(e).replace(e.param, SEARCH_FLAGS[e.param], 1)) from None
    if beams is not None and beams > 1:
        given = [f"--{key.replace('_', '-')}" for key in (*SAMPLING_KEYS, "prompt_lookup", "show_experts")
                 if getattr(args, key, None) not in (None, False) and key != "sampler_order"] + \
                (["--stop"] if getattr(args, "stop", None) else [])
        if given:
            raise FlagError(f"--num-beams searches deterministically; it cannot be combined with {', '.join(given)}")


def sampling_options(args: argparse.Namespace, model=None) -> dict:
    """generate_tokens' sampling keyword arguments: the flags (main() has checked them), with the model's
    generation_config.json defaults filling in what was not given (Transformers' behaviour: released Phi
    models are greedy, the nano models sample)."""
    given = {key: getattr(args, key, None) for key in SAMPLING_KEYS}
    try:
        options = resolve_options(given, getattr(model, "sampling_defaults", None))
        if getattr(args, "prompt_lookup", None):
            options["prompt_lookup_num_tokens"] = args.prompt_lookup
        return options
    except OptionError as e:  # the flags passed check_flags, so the model's own defaults are at fault
        raise PhinanoError(f"{args.model}: generation_config.json: {e}") from None


def load_model(args: argparse.Namespace):
    import phinano

    return phinano.load(args.model, backend=args.backend, threads=args.threads, revision=args.revision,
                        quantize=args.quantize)


def warm_up(model, ids) -> None:
    """Compile the kernels (Numba) on a 2-token generation from the prompt's first tokens, so that a speed
    report counts generation, not compilation. Prints nothing."""
    model.generate(ids[:8], 2, stop_token_ids=[])


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import stream_text

    model = load_model(args)  # main() has checked the flags
    sampling = sampling_options(args, model)
    tok = model.tokenizer
    if tok is None:
        raise PhinanoError(f"{args.model}: no tokenizer.json in the model folder, cannot encode a text prompt")
    images = getattr(args, "image", None) or []
    prompt = with_image_markers(args.prompt, len(images))
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=not images)
    else:
        ids = prompt
    vectors = None
    if images:  # Phi-3-vision: markers -> one id each -> each image's positions (phinano/vision/)
        ids, vectors = model.with_images(tok.encode_prompt(ids), images)
    elif not args.chat:
        ids = tok.encode(prompt)
    context = model.config.max_position_embeddings
    if len(ids) >= context:  # checked before the prompt is echoed: nothing half-written
        raise PhinanoError(f"the prompt is {len(ids)} tokens long; the model's context holds {context}, "
                           "leaving no room for a new token")
    if args.verbose:
        warm_up(model, [i for i in ids if i >= 0])
    if not args.chat:
        print(args.prompt, end="", flush=True)
    stats: dict = {}
    if (getattr(args, "num_beams", None) or 1) > 1:  # the best hypothesis, printed once found
        from .beams import beam_search
        from .generate import TextStops

        tokens, _ = beam_search(model, ids, args.max_new_tokens, args.num_beams, stats=stats)
        text = TextStops(tok)
        print("".join(text.push(t) for t in tokens) + text.flush())
    elif getattr(args, "show_experts", False):  # one line per token: its text and its experts per layer
        from .tracing import print_expert_trace

        if not args.chat:
            print()  # end the echoed prompt's line
        print_expert_trace(model, ids, args.max_new_tokens, sampling, args.stop, stats)
    else:
        pieces = stream_text(model, ids, args.max_new_tokens, stop_strings=args.stop, stats=stats, images=vectors,
                             **sampling)
        if args.chat:  # a reasoning model's <think> section, framed as in `phinano chat`
            from .chat import framed

            pieces = framed(pieces)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
    if args.verbose:
        print(speed_line(stats), file=sys.stderr)
    return 0


def human_size(nbytes: float) -> str:
    """Bytes in the unit that suits them: 812 B, 6.4 MB, 7.64 GB (decimal units, like the file sizes on the Hub)."""
    for unit, scale, digits in (("GB", 1e9, 2), ("MB", 1e6, 1), ("kB", 1e3, 1)):
        if nbytes >= scale:
            return f"{nbytes / scale:.{digits}f} {unit}"
    return f"{nbytes:.0f} B"


def cmd_info(args: argparse.Namespace) -> int:
    from .families import family

    model = load_model(args)
    cfg, w = model.config, model.weights
    total, active = model.parameter_counts()
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # float32 K and V
    context = cfg.max_position_embeddings
    generation = min(context, 4096)
    lines = [
        ("model", model.name),
        ("architecture", cfg.architecture),
        *([("shaped like", family(cfg))] if family(cfg) else []),
        ("parameters", f"{total:,}" + (f" total, {active:,} active per token" if active != total else "")),
        ("layers", f"{cfg.num_hidden_layers} x (hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}, "
                   f"kv heads {cfg.num_key_value_heads}, head dim {cfg.head_dim}, mlp {cfg.intermediate_size})"),
        *([("experts", f"{cfg.num_local_experts}, {cfg.num_experts_per_tok} active per token")] if cfg.is_moe else []),
        *(model.blocks.describe(cfg) if hasattr(model.blocks, "describe") else []),  # Phi-3-small: pattern, muP
        ("vocab", f"{cfg.vocab_size}"),
        ("rope", f"{cfg.rope_type}, theta {cfg.rope_theta:g}, rotary dims {cfg.rotary_dim} of {cfg.head_dim}"
                 + (f", original length {cfg.original_max_position_embeddings}" if cfg.rope_type == "longrope" else "")),
        ("context", f"{context} tokens" + (f", sliding window {cfg.sliding_window}" if cfg.sliding_window else "")),
        ("dtype on disk", w.dtype),
        ("weights", f"{human_size(w.nbytes)}, memory-mapped"),
        ("kv cache", f"{human_size(kv_per_token)} per token (float32), {human_size(kv_per_token * context)} "
                     f"at the full {context}-token context"),
        ("memory needed", f"about {human_size(w.nbytes + kv_per_token * generation)} for a "
                          f"{generation}-token generation"),
        ("stop tokens", ", ".join(str(t) for t in model.stop_token_ids) or "none"),
        ("backend", model.backend),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import Chat, repl

    model = load_model(args)  # main() has checked the flags
    chat = Chat(model, system=args.system, max_new_tokens=args.max_new_tokens,
                sampling=sampling_options(args, model), stop_strings=args.stop)
    if args.verbose:
        warm_up(model, model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]))
    return repl(chat, sys.stdin, sys.stdout, sys.stderr, speed_line if args.verbose else None)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import bind, check_extra, serve, served_name

    check_extra()  # before loading a model: a missing extra or a port in use is a one-line error
    sock = bind(args.host, args.port)
    model = load_model(args)
    serve(model, args.name or served_name(args.model), sock, args.max_queue, args.max_request_bytes, args.threads,
          max_batch=args.max_batch)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Write the checkpoint as a GGUF file that llama.cpp and Ollama load, its matrices in the chosen type."""
    from .config import load_config
    from .formats import read_tensors
    from .formats.gguf_vocab import vocab_metadata
    from .formats.hub import resolve
    from .quantize import write_quantized

    folder = resolve(args.model, revision=args.revision)
    if folder.is_file():
        raise PhinanoError(f"{args.model}: already a GGUF file; quantize reads a safetensors checkpoint folder")
    cfg = load_config(folder)
    vocab = vocab_metadata(folder, cfg.vocab_size)  # a bad tokenizer fails before the weights are read
    out = write_quantized(folder, cfg, read_tensors(folder), args.type, args.out, vocab)
    print(f"wrote {out} ({human_size(out.stat().st_size)}, {args.type})")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    """Pictures of one forward (logit lens, attention, routing, residual norms) and an index.html."""
    from .pictures import check_matplotlib, number_list, write_trace

    for flag in ("layers", "heads"):  # their form now; their range once the model says how many there are
        if getattr(args, flag) is not None:
            try:
                number_list(getattr(args, flag), flag)
            except ValueError as e:
                raise FlagError(str(e)) from None
    check_matplotlib()  # before loading a model: a missing extra is a one-line error
    model = load_model(args)
    page = write_trace(model, args.prompt, args.out, layers=args.layers, heads=args.heads)
    print(f"wrote {page}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    """phinano against Transformers, stage by stage: [OK]/[DIFF] lines, exit 1 on any DIFF."""
    from .diff import run_diff

    if not args.rtol > 0:
        raise FlagError(f"--rtol must be > 0, got {args.rtol}")
    same = run_diff(args.model, args.prompt, args.rtol, args.backend, args.threads, args.revision)
    return 0 if same else 1


def with_image_markers(text: str, n_images: int) -> str:
    """The prompt with `<|image_1|>\n` .. `<|image_n|>\n` in front (Phi-3-vision's released user turn), unless
    it places its image markers itself."""
    if n_images == 0 or "<|image_" in text:
        return text
    return "".join(f"<|image_{i}|>\n" for i in range(1, n_images + 1)) + text


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: with prefixes allowed, `generate --prompt TEXT` was read as
    # --prompt-lookup and failed with "invalid int value", naming a flag the user never wrote
    parser = argparse.ArgumentParser(prog="phinano", description="Phi-3 family inference in NumPy + Numba",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, allow_abbrev=False)

    g = command("generate", "continue a prompt (or answer it with --chat), streaming to stdout")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--show-experts", action="store_true",
                   help="PhiMoE: print each generated token with the experts it was routed to per layer")
    g.add_argument("--verbose", "-v", action="store_true", help="print a speed report on stderr")
    g.add_argument("--num-beams", type=int, default=None, metavar="B",
                   help="beam search with B beams (Transformers' num_beams): prints the best hypothesis at the end")
    g.add_argument("--image", action="append", metavar="PATH",
                   help="Phi-3-vision: an image for the prompt (repeatable; <|image_1|> ... placed in front unless "
                        "the prompt has them)")
    add_prompt_args(g)
    g.set_defaults(func=cmd_generate)

    i = command("info", "architecture, parameter count, dtype, memory")
    add_model_args(i)
    i.set_defaults(func=cmd_info)

    c = command("chat", "interactive chat in the terminal (/reset, /system TEXT, /exit)")
    add_model_args(c)
    add_sampling_args(c)
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--verbose", "-v", action="store_true", help="print a speed report after each answer")
    c.set_defaults(func=cmd_chat)

    s = command("serve", "OpenAI- and Ollama-compatible HTTP server (needs phinano[serve])")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", default=None, help="model name clients send (default: the folder's or GGUF file's "
                                                "name, NAME for ollama:NAME, else --model)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond this get a 503")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most (default 8)")
    s.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024, help="larger bodies get a 413")
    s.set_defaults(func=cmd_serve)

    q = command("quantize", "write a safetensors checkpoint as a GGUF file of int8/int4 blocks")
    q.add_argument("--model", "-m", required=True, help="local folder, nano model name or Hub repo id (safetensors)")
    q.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    q.add_argument("--type", required=True, choices=sorted(QUANT_TYPES),
                   help="block type of the matrices (the _m mixes follow llama.cpp: some tensors get more bits)")
    q.add_argument("--out", required=True, type=Path, help="the .gguf file to write (written whole or not at all)")
    q.set_defaults(func=cmd_quantize)

    t = command("trace", "pictures of one forward: logit lens, attention, expert routing, residual "
                         "norms, tied together in an index.html (needs phinano[pictures])")
    add_model_args(t)
    t.add_argument("--out", "-o", type=Path, default=Path("phinano-trace"), help="folder to write (default phinano-trace)")
    t.add_argument("--layers", default=None, help="attention maps of these layers, e.g. 0,3 (default: first and last)")
    t.add_argument("--heads", default=None, help="of these heads, e.g. 0,1 (default: all)")
    add_prompt_args(t)
    t.set_defaults(func=cmd_trace)

    d = command("diff", "compare phinano with Transformers stage by stage (needs torch, transformers)")
    d.add_argument("--model", "-m", default=DEFAULT_MODEL, help="local folder, .gguf file, nano model name or Hub repo id")
    d.add_argument("--backend", choices=("numba", "numpy"), default="numba", help="kernel backend (default numba)")
    d.add_argument("--threads", type=int, default=None, help="kernel threads, 1 to the cores available")
    d.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    d.add_argument("--prompt", default=None, help="text to run (default: a few lines of Python)")
    d.add_argument("--rtol", type=float, default=1e-4, help="a stage differs past rtol x its largest value (1e-4)")
    d.set_defaults(func=cmd_diff)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_flags(args)
        return args.func(args)
    except PhinanoError as e:
        print(f"phinano: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, FlagError) else 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `phinano generate ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
