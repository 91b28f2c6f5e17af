"""``steerserve chat``: an interactive chat whose sliders change mid-conversation.

    steerserve chat --url http://127.0.0.1:8000 --attributes verbosity=1
    > What is a black hole?
    > /verbosity 4          # the next reply is steered with verbosity 4; the history is kept

Commands: ``/NAME LEVEL`` for any attribute (``/complexity 0``), ``/attributes``,
``/reset`` (forget the conversation), ``/help``, ``/quit``. Replies stream; after each,
the attribute line the server applied is shown. Lines come from stdin, so a pipe
(``printf 'Hi\\n/verbosity 0\\nHi\\n' | steerserve chat``) drives it as well as a person.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from steerserve.attributes import ATTRIBUTE_NAMES, InvalidAttribute, format_attributes, validate_attributes

HELP = ("commands: /NAME LEVEL (attributes: " + ", ".join(ATTRIBUTE_NAMES) + "), /attributes, /reset, /help, /quit")


def parse_attribute_flags(text: str | None) -> dict[str, int]:
    """``verbosity=1,complexity=2`` -> validated sliders (the same syntax for every CLI here)."""
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, level = item.partition("=")
        if not sep:
            raise ValueError(f"--attributes item {item!r} is not NAME=LEVEL")
        try:
            values[name.strip()] = int(level)
        except ValueError:
            raise ValueError(f"--attributes {name.strip()}: {level!r} is not an integer") from None
    return validate_attributes(values)


class ChatSession:
    """The REPL's state (history and sliders) and its line handler, apart from any terminal."""

    def __init__(self, client: Any, model: str, attributes: dict[str, int], params: dict[str, Any],
                 system: str | None, out: TextIO) -> None:
        self.client, self.model, self.params, self.system, self.out = client, model, params, system, out
        self.attributes = dict(attributes)
        self.history: list[dict[str, str]] = []

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            return self.command(line[1:].split())
        self.reply(line)
        return True

    def command(self, words: list[str]) -> bool:
        name = words[0].lower() if words else ""
        if name in ("quit", "exit", "q"):
            return False
        if name == "reset":
            self.history.clear()
            self.say("(conversation cleared)")
        elif name == "attributes":
            self.say("sliders: " + format_attributes(self.attributes))
        elif name in ATTRIBUTE_NAMES and len(words) == 2:
            self.set_slider(name, words[1])
        else:
            self.say(HELP)
        return True

    def set_slider(self, name: str, level: str) -> None:
        try:
            self.attributes.update(validate_attributes({name: int(level)}))
        except (ValueError, InvalidAttribute) as exc:
            self.say(f"error: {exc}")
            return
        self.say(f"({name} = {self.attributes[name]})")

    def reply(self, text: str) -> None:
        """Stream one assistant turn; on an API error the user turn is dropped so the history stays valid."""
        from steerserve.clients.client import SteerAPIError

        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages.append({"role": "user", "content": text})
        parts: list[str] = []
        applied: dict[str, int] | None = None
        try:
            for chunk in self.client.chat_stream(self.model, messages, attributes=self.attributes, **self.params):
                applied = chunk.attributes or applied
                for choice in chunk.choices:
                    if choice.delta.content:
                        parts.append(choice.delta.content)
                        self.out.write(choice.delta.content)
                        self.out.flush()
        except SteerAPIError as exc:
            self.say(f"\nerror: {exc}")
            return
        self.out.write("\n")
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(parts)}]
        if applied:
            self.say(f"[attributes {format_attributes(applied)}]")

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerserve chat", description="Chat with a steerserve model; "
                                     "change sliders mid-conversation with /NAME LEVEL.")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server address")
    parser.add_argument("--model", help="model id (default: the server's first model)")
    parser.add_argument("--attributes", help="starting sliders, e.g. verbosity=1,complexity=2")
    parser.add_argument("--system", help="a system message")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="above 1 discourages repeating prompt and reply tokens (small models loop without it)")
    parser.add_argument("--loop-guard", type=int, metavar="COPIES",
                        help="end a reply at this many verbatim copies in a row of a repeated stretch (default: "
                             "the model's, see its card; 0: off)")
    parser.add_argument("--api-key", help="bearer key, if the server wants one")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from steerserve.clients.client import SteerAPIError, SteerClient

    attributes = parse_attribute_flags(args.attributes)
    interactive = sys.stdin.isatty()
    with SteerClient(args.url, api_key=args.api_key) as client:
        try:
            model = args.model or client.models().data[0].id
        except (SteerAPIError, IndexError) as exc:
            print(f"steerserve chat: no model at {args.url}: {exc}", file=sys.stderr)
            return 1
        sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
        if args.repetition_penalty != 1.0:
            sampling["repetition_penalty"] = args.repetition_penalty
        if args.loop_guard is not None:
            sampling["loop_guard"] = args.loop_guard
        session = ChatSession(client, model, attributes, sampling, args.system, sys.stdout)
        if interactive:
            session.say(f"chatting with {model}; {HELP}")
        while True:
            if interactive:
                sys.stdout.write("> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line or not session.handle(line):
                return 0
