"""What every scheduler's options share: names, the form's field order, and the reader of
extra directive lines, which each scheduler drives with its own DirectivePolicy.

Extra directives are an ALLOWLIST: resource and placement options only. Every other
option is refused, with the reason when it is a known one. A policy's tables are the
whole policy; directive_options reads a line the way sbatch's or qsub's getopt does (long
option names in full, short options clustered, a value glued, after '=' or in the next
word, also when that word starts with '-') and looks every option up in them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Characters Slurm and PBS accept in account, partition, qos and queue names.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$", re.ASCII)
# One directive argument: options, values, lists; no shell or quoting characters.
DIRECTIVE_ARG_RE = re.compile(r"^[A-Za-z0-9_=:,.+/@%\-\[\] ]{1,200}$", re.ASCII)

# How an option takes its value, as in getopt: required (--opt=v, --opt v, -ov, -o v),
# optional (only glued: --opt=v, -ov) or none.
VALUE, OPTIONAL, NO_VALUE = "value", "optional", "none"

SET_BY_US = "set by activate-ray: "
MAKES_AN_ARRAY = "makes a job array: many copies of the job, each starting a Ray cluster of its own"


def check_name(value: str, what: str) -> str:
    if value and not NAME_RE.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not a valid scheduler name: use letters, digits, "
            "'_', '.', '-' (up to 64, starting with a letter or digit)"
        )
    return value


def positioned(model: type[BaseModel]) -> type[BaseModel]:
    """Give every field of a group its place in the form: the order it is declared in."""
    for position, field in enumerate(model.model_fields.values()):
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        field.json_schema_extra = {**extra, "position": position}
    model.model_rebuild(force=True)
    return model



def pattern_field(default: Any, title: str, description: str, pattern: str) -> Any:
    """A text field of a form that checks it against pattern as it is typed (a validator of
    the model checks it again, with the reason)."""
    return Field(default, title=title, description=description, json_schema_extra={"pattern": pattern})


def name_field(title: str, description: str) -> Any:
    """A scheduler name (account, partition, queue, QOS): empty, or what Slurm and PBS accept."""
    return pattern_field("", title, description, "^$|" + NAME_RE.pattern)


def walltime_field(description: str, walltime_re: re.Pattern[str]) -> Any:
    """The job's walltime, an hour unless set, in the scheduler's own form (walltime_re)."""
    return pattern_field("01:00:00", "Walltime", description, walltime_re.pattern)


def nodes_field(description: str) -> Any:
    """How many nodes the job asks for: one Ray node on each."""
    return Field(1, ge=1, le=10000, title="Nodes", description=description)


def directives_field(description: str) -> Any:
    """More directive lines, none unless set: JobOptions checks them through the group's policy."""
    return Field("", title="Extra directives", description=description)


class DirectiveRefused(ValueError):
    """One option of an extra directive line is refused (the line number is added by the caller)."""


@dataclass(frozen=True)
class DirectivePolicy:
    """How one scheduler's directive lines read, and which options they may carry."""

    prefix: str  # "#SBATCH"
    allowed: dict[str, str]  # option -> VALUE, OPTIONAL or NO_VALUE
    refused: dict[str, str]  # option -> why
    # short letter -> long name; None: the letters are the names (PBS)
    short: dict[str, str] | None = None
    long_options: bool = False  # --name[=value] (sbatch)
    split_words: frozenset[str] = frozenset()  # words that split the script into several jobs
    not_an_option_hint: str = ""
    check_option: Callable[[str, str | None], None] | None = None  # further checks of one option

    def takes(self, name: str, shown: str) -> str:
        """What an allowed option takes; else DirectiveRefused naming it, with the reason."""
        if name in self.allowed:
            return self.allowed[name]
        if name in self.refused:
            raise DirectiveRefused(f"{shown} is not allowed: {self.refused[name]}")
        if self.long_options:
            spelled = "long names in full: " + ", ".join(sorted("--" + option for option in self.allowed))
        else:
            spelled = ", ".join(sorted("-" + option for option in self.allowed))
        raise DirectiveRefused(
            f"{shown} is not in the allowlist of {self.prefix} options (resource and placement options only; {spelled})"
        )


def directive_options(argument: str, policy: DirectivePolicy) -> list[tuple[str, str, str | None]]:
    """(name, as written, value or None) of every option of one directive line, read as
    sbatch or qsub reads it; DirectiveRefused at the first option not in the allowlist."""
    words, options, index = argument.split(), [], 0
    if split := next((w for w in words if w.lower() in policy.split_words), None):
        raise DirectiveRefused(f"{split!r} is not allowed: it splits the script into a heterogeneous job")

    def value_word(shown: str) -> str:
        # A required value that is not glued on is the next word, whatever it starts with
        # (getopt does the same). sbatch would take it from the next line: refused.
        nonlocal index
        if index == len(words):
            raise DirectiveRefused(f"{shown} needs a value on the same line")
        index += 1
        return words[index - 1]

    while index < len(words):
        word = words[index]
        index += 1
        if policy.long_options and word.startswith("--") and len(word) > 2:
            name, equals, value = word[2:].partition("=")
            shown = f"'--{name}'"
            takes = policy.takes(name, shown)
            if takes == NO_VALUE and equals:
                raise DirectiveRefused(f"{shown} takes no value")
            if takes == VALUE and not equals:
                value = value_word(shown)
            options.append((name, word, value if equals or takes == VALUE else None))
            continue
        if not word.startswith("-") or word in ("-", "--") or word.startswith("--"):
            raise DirectiveRefused(f"{word[:40]!r} is not an option" + policy.not_an_option_hint)
        known = policy.allowed.keys() | policy.refused.keys()
        if policy.long_options and (long := word[1:].partition("=")[0]) in known and len(long) > 1:
            raise DirectiveRefused(
                f"{word[:40]!r} is --{long} written with one dash, which sbatch reads as -{long[0]} {word[2:]}: "
                f"write --{long}" + (f" (--{long} is not allowed: {policy.refused[long]})" if long in policy.refused else "")
            )
        # A cluster of short options, as getopt reads it: -s, -sC a100, -Ca100, -C a100.
        for position in range(1, len(word)):
            letter = word[position]
            if policy.short is not None:
                name = policy.short.get(letter, "")
                shown = f"'-{letter}'" + (f" (--{name})" if name else "")
                takes = policy.takes(name or letter, shown)
            else:
                name, shown = letter, f"'-{letter}'"
                takes = policy.takes(letter, shown)
            glued = word[position + 1 :]
            if takes == NO_VALUE:
                options.append((name, f"-{letter}", None))
                continue
            if takes == VALUE and not glued:
                glued = value_word(shown)
            options.append((name, f"-{letter}", glued or None))
            break
    return options


def check_directives(value: str, policy: DirectivePolicy) -> str:
    """The extra directive lines, each checked against the policy; stripped, one per line."""
    prefix = policy.prefix
    for number, line in enumerate(value.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if not line.startswith(prefix + " "):
            raise ValueError(f"extra directive line {number} must start with '{prefix} ': {line[:80]!r}")
        argument = line[len(prefix) + 1 :].strip()
        if not DIRECTIVE_ARG_RE.fullmatch(argument) or not argument.startswith("-"):
            raise ValueError(
                f"extra directive line {number} {line[:80]!r}: expected '{prefix} -option[=value]' "
                "with letters, digits and _=:,.+/@%-[] only"
            )
        try:
            for name, _, setting in directive_options(argument, policy):
                if policy.check_option is not None:
                    policy.check_option(name, setting)
        except DirectiveRefused as refused:
            raise ValueError(f"extra directive line {number}: {refused}") from None
    return "\n".join(line.strip() for line in value.splitlines() if line.strip())


class JobOptions(BaseModel):
    """What the SLURM and PBS groups check alike: their scheduler names (whichever of account,
    partition, qos and queue the group has), the walltime in the scheduler's own form, and the
    extra directive lines through the scheduler's policy. Each group names its own."""

    # a key the group does not have is a typo the user should hear of, not one to drop
    model_config = ConfigDict(extra="forbid")
    # Each group sets these; the last three beside the field they check.
    group: ClassVar[str]  # as the settings name it: "slurm", "pbs"
    walltime_re: ClassVar[re.Pattern[str]]
    walltime_is: ClassVar[str]  # what a walltime is, for the message: "a PBS walltime: use ..."
    directive_policy: ClassVar[DirectivePolicy]

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        # every group's fields take their places in the form, so none can forget to
        super().__pydantic_init_subclass__(**kwargs)
        positioned(cls)

    @field_validator("account", "partition", "qos", "queue", check_fields=False)
    @classmethod
    def _names(cls, value: str, info) -> str:
        return check_name(value, f"{cls.group}.{info.field_name}")

    @field_validator("walltime", check_fields=False)
    @classmethod
    def _walltime(cls, value: str) -> str:
        if not cls.walltime_re.fullmatch(value):
            raise ValueError(f"{cls.group}.walltime {value!r} is not {cls.walltime_is}")
        return value

    @field_validator("extra_directives", check_fields=False)
    @classmethod
    def _directives(cls, value: str) -> str:
        return check_directives(value, cls.directive_policy)
