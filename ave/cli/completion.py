"""Bash completion for ``ave``, written from ave's own argument parser.

``ave completion`` prints the script; the Debian package installs its output as
/usr/share/bash-completion/completions/ave when it is built, so the completion
always knows exactly the commands and options of the ``ave`` beside it. From a
source tree: ``source <(.venv/bin/ave completion)``.

It completes commands, options, directories after ``--home``, the installed
equipment types at the start of a PROFILE (``relay,``), the choices of a choice
argument (``open``/``close``), and after ``ave run ... --`` a command, then files.
The words are split on blanks only: bash itself also splits at ``=`` and ``:``,
which a PROFILE holds.
"""
from __future__ import annotations

import argparse
import sys

from ave.equipment import load_types

_FUNCTION = r'''# bash completion for ave, made by `ave completion` from ave's argument parser
_ave() {
    local line=${COMP_LINE:0:COMP_POINT} cur word i count=0 skip=
    local -a words kinds
    read -ra words <<< "$line"
    if [[ $line == *[[:space:]] ]]; then
        cur=
    else
        cur=${words[-1]}
        unset 'words[-1]'
    fi
    COMPREPLY=()
    [[ $cur == *[=:]* ]] && return
    if (( ${#words[@]} == 1 )); then
        COMPREPLY=($(compgen -W '@COMMANDS@ --version --help' -- "$cur"))
        return
    fi
    local options valued positionals
    case ${words[1]} in
@CASES@
        *) return ;;
    esac
    for ((i = 2; i < ${#words[@]}; i++)); do
        if [[ ${words[i]} == -- && ${words[1]} == run ]]; then
            if (( i == ${#words[@]} - 1 )); then
                COMPREPLY=($(compgen -c -- "$cur"))
            else
                COMPREPLY=($(compgen -f -- "$cur"))
            fi
            return
        fi
    done
    if [[ " $valued " == *" ${words[-1]} "* ]]; then
        [[ ${words[-1]} == --home ]] && COMPREPLY=($(compgen -d -- "$cur"))
        return
    fi
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$options" -- "$cur"))
        return
    fi
    for ((i = 2; i < ${#words[@]}; i++)); do
        word=${words[i]}
        if [[ -n $skip ]]; then skip=; continue; fi
        if [[ $word == -* ]]; then
            [[ " $valued " == *" $word "* ]] && skip=1
            continue
        fi
        count=$((count + 1))
    done
    kinds=($positionals)
    (( ${#kinds[@]} )) || return
    local kind=${kinds[-1]}
    if (( count < ${#kinds[@]} )); then
        kind=${kinds[count]}
    elif [[ $kind != *+ ]]; then
        return
    fi
    case ${kind%+} in
        profile)
            [[ $cur == *,* ]] && return
            COMPREPLY=($(compgen -S , -W '@TYPES@' -- "$cur"))
            compopt -o nospace 2>/dev/null ;;
        choice:*)
            local choices=${kind#choice:}
            COMPREPLY=($(compgen -W "${choices//|/ }" -- "$cur")) ;;
    esac
}
complete -F _ave ave
'''

_CASE = "        {}) options='{}'; valued='{}'; positionals='{}' ;;"


def script(parser: argparse.ArgumentParser, types: list[str]) -> str:
    """The completion script for ``parser`` (ave's) and the equipment ``types``."""
    commands = _subcommands(parser)
    cases = [_CASE.format(name, ' '.join(_options(sub)), ' '.join(_valued(sub)),
                          ' '.join(_positionals(sub)))
             for name, sub in commands.items()]
    return (_FUNCTION.replace('@COMMANDS@', ' '.join(commands))
            .replace('@CASES@', '\n'.join(cases))
            .replace('@TYPES@', ' '.join(sorted(types))))


def print_script(parser: argparse.ArgumentParser) -> int:
    try:
        types = sorted(load_types())
    except Exception:  # a broken plug-in costs the type names, not the completion
        types = []
    sys.stdout.write(script(parser, types))
    return 0


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [flag for action in parser._actions for flag in action.option_strings]


def _valued(parser: argparse.ArgumentParser) -> list[str]:
    """The options that take a value (the next word is theirs)."""
    return [flag for action in parser._actions if action.option_strings and action.nargs != 0
            for flag in action.option_strings]


def _positionals(parser: argparse.ArgumentParser) -> list[str]:
    """Each positional's kind: ``profile``, ``choice:a|b`` or ``word``; ``+`` when it
    repeats."""
    kinds = []
    for action in parser._actions:
        if action.option_strings:
            continue
        if action.dest in ('profile', 'profiles'):
            kind = 'profile'
        elif action.choices:
            kind = 'choice:' + '|'.join(str(choice) for choice in action.choices)
        else:
            kind = 'word'
        kinds.append(kind + ('+' if action.nargs in ('+', '*') else ''))
    return kinds
