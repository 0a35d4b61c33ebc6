"""`gptforge chat`: talk to a chat model in the terminal (multi-turn, streaming), or get one reply.

A thin layer over `gptforge.chat.ChatSession`: this module only reads lines, runs the /commands and
prints. On a terminal: readline line editing and history, Ctrl-C stops the reply being written (the part
shown stays in the conversation) and at the prompt only clears the line, Ctrl-D quits. `-p TEXT`, or text
piped to standard input (all of it, as one message), prints one reply and exits.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING, TextIO

from ..errors import UserError
from ..numeric import SEED
from ._options import (add_compile_option, add_device_options, add_json_output_options, add_quantize_option,
                       add_sampling_options, check_json_output, json_output_fields, prepare_model,
                       resolve_device_for, sampling_config)

if TYPE_CHECKING:
    from ..chat.session import ChatSession

HELP = """commands:
  /reset          start a new conversation (the system message stays)
  /system TEXT    set the system message (/system alone removes it)
  /undo           drop the last exchange
  /save FILE      write the conversation as a `messages` JSON line (what `prepare --chat` reads)
  /help           this list
  /quit           leave (or Ctrl-D); Ctrl-C stops a reply being written
  //TEXT          send TEXT starting with a single /"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat", help="talk to a chat model (multi-turn, streaming)",
        description="Talk to a chat model made by `gptforge sft` (or an exported/imported one with a chat "
                    "template). On a terminal: a conversation with /commands (/help lists them). With -p, or "
                    "with text piped to standard input, one reply is printed.")
    p.add_argument("--model", required=True, help="run directory, checkpoint or hf:DIR of a chat model")
    p.add_argument("-p", "--prompt", default=None, metavar="TEXT", help="print the reply to TEXT and exit")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message for the conversation")
    add_sampling_options(p, max_new_tokens=512, temperature=0.7, per="reply")
    p.add_argument("--seed", type=SEED, default=None,
                   help="random seed: the same seed and the same messages give the same conversation")
    p.add_argument("--stats", action="store_true",
                   help="after each reply, print its token count, time to first token and tokens/s to stderr")
    add_json_output_options(p, also_json=True)
    add_device_options(p)
    add_quantize_option(p)
    add_compile_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..chat.session import ChatSession, require_chat_model
    from ..devices import resolve_dtype
    from ..loading import load_model, resolve_model_source

    config = sampling_config(args, **json_output_fields(args))
    message = args.prompt
    if message is not None and not message.strip():
        raise UserError("-p: the message is empty; give the text to answer, e.g. -p \"What does json.dumps do?\"")
    if message is None and not sys.stdin.isatty():
        message = sys.stdin.read()
        if not message.strip():
            raise UserError("standard input is empty; pipe a message, use -p TEXT, or run on a terminal to chat")
    device = resolve_device_for(args)
    source = resolve_model_source(args.model)
    model, tokenizer = load_model(source, device, resolve_dtype(args.dtype, device))
    prepare_model(model, args, weights_file=source.weights)  # on CPU: faster products (prepacked, quantized, compiled)
    require_chat_model(tokenizer, f"--model {args.model}")
    check_json_output(config, tokenizer, args)
    session = ChatSession(model, tokenizer, config, system=args.system, seed=args.seed,
                          notify=lambda text: print(f"[{text}]", file=sys.stderr, flush=True))
    if message is not None:
        print_reply(session, message.rstrip("\n"), sys.stdout, args.stats)
        return 0
    return repl(session, args.stats)


def print_reply(session: "ChatSession", text: str, out: TextIO, stats: bool) -> None:
    """Stream the reply to `text`; Ctrl-C (KeyboardInterrupt) ends the reply, kept as far as it was shown,
    and propagates."""
    reply = session.send(text)
    try:
        for piece in reply:
            out.write(printable(piece))
            out.flush()
    finally:
        reply.close()
        out.write("\n")
        out.flush()
        if stats:
            print(describe_stats(session), file=sys.stderr, flush=True)


# Control characters a model may write (ESC starts terminal escape sequences that clear the screen, move the
# cursor or retitle the window; CR overwrites the line shown): all C0 but tab and newline, DEL, and C1.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with control characters shown as escapes (ESC as `\\x1b`, CR as `\\r`), newlines and tabs kept:
    what the model wrote stays visible, and cannot drive the terminal. The conversation keeps the raw text."""
    return _CONTROL.sub(lambda m: "\\r" if m.group() == "\r" else f"\\x{ord(m.group()):02x}", text)


def describe_stats(session: "ChatSession") -> str:
    s = session.last
    parts = [f"{s.reply_tokens} tokens ({s.finish_reason})", f"prompt {s.prompt_tokens} tokens"]
    if s.first_token_s is not None:
        parts.append(f"first token after {s.first_token_s * 1000:.0f} ms")
    if s.tokens_per_s is not None:
        parts.append(f"{s.tokens_per_s:.1f} tokens/s")
    return "[" + ", ".join(parts) + "]"


def repl(session: "ChatSession", stats: bool) -> int:
    """The interactive loop on a terminal."""
    try:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    except ImportError:  # not on every platform's Python; plain input() still works
        pass
    print("Chat: type a message; /help lists commands, Ctrl-D quits.", file=sys.stderr, flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line, as a shell does
            print(file=sys.stderr)
            continue
        if not line.strip():
            continue
        try:
            if line.startswith("/") and not line.startswith("//"):
                if run_command(session, line) == "quit":
                    return 0
                continue
            print_reply(session, line[1:] if line.startswith("//") else line, sys.stdout, stats)
        except KeyboardInterrupt:
            print("[stopped]", file=sys.stderr, flush=True)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
        except OSError as e:
            from ..cli import describe_os_error
            print(f"error: {describe_os_error(e)}", file=sys.stderr, flush=True)


def run_command(session: "ChatSession", line: str) -> str | None:
    """Do one /command; "quit" when the loop should end."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if name in ("/quit", "/exit"):
        return "quit"
    if name == "/help":
        say(HELP)
    elif name == "/reset":
        session.reset()
        say("[new conversation]")
    elif name == "/system":
        session.set_system(rest or None)
        say(f"[system message: {rest}]" if rest else "[no system message]")
    elif name == "/undo":
        say("[last exchange removed]" if session.undo() else "[nothing to undo]")
    elif name == "/save":
        if not rest:
            raise UserError("/save needs a file name, e.g. /save chat.jsonl")
        say(f"[saved to {session.save(rest)}]")
    else:
        raise UserError(f"unknown command {name}; /help lists the commands (start a message with // to send a /)")
    return None
