"""`zimage-lora completion bash|zsh`: a tab-completion script generated from the parser itself."""

from __future__ import annotations

import argparse
import shlex

SUMMARY = "print a shell completion script (bash, zsh)"

HELP = """Print a tab-completion script for the commands, their options and option values; paths
complete as usual. Load it in the current shell, or add the line to ~/.bashrc / ~/.zshrc.

examples:
  eval "$(zimage-lora completion bash)"
  eval "$(zimage-lora completion zsh)"
  zimage-lora completion bash > ~/.local/share/bash-completion/completions/zimage-lora
"""

TEMPLATE = r"""# zimage-lora completion for {shell}: eval "$(zimage-lora completion {shell})"
{preamble}_zimage_lora() {{
    local cur prev cmd i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    cmd=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in -*) ;; *) cmd="${{COMP_WORDS[i]}}"; break ;; esac
    done
    if [[ -z "$cmd" ]]; then
        COMPREPLY=($(compgen -W {top} -- "$cur"))
        return
    fi
    case "$cmd $prev" in
{values}    esac
    if [[ "$cur" == -* ]]; then
        case "$cmd" in
{options}        esac
        return
    fi
    COMPREPLY=($(compgen -f -- "$cur"))
}}
complete -o filenames -o bashdefault -F _zimage_lora zimage-lora
"""

SHELLS = {"bash": "", "zsh": "autoload -U +X bashcompinit && bashcompinit\n"}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "completion", help=SUMMARY, description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("shell", choices=sorted(SHELLS), help="the shell to complete in")
    p.set_defaults(run=run)


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings]


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for `parser` (the full `zimage-lora` parser)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = {name: p for name, p in sub.choices.items()}
    values, options = [], []
    for name, p in commands.items():
        words = shlex.quote(" ".join(_options(p)))
        options.append(f'            {name}) COMPREPLY=($(compgen -W {words} -- "$cur")) ;;\n')
        for action in p._actions:
            if action.choices and action.option_strings:
                words = shlex.quote(" ".join(map(str, action.choices)))
                for flag in action.option_strings:
                    values.append(f'        "{name} {flag}") COMPREPLY=($(compgen -W {words} -- "$cur")); return ;;\n')
    top = shlex.quote(" ".join([*commands, *_options(parser)]))
    return TEMPLATE.format(
        shell=shell, preamble=SHELLS[shell], top=top, values="".join(values), options="".join(options)
    )


def run(args: argparse.Namespace) -> int:
    from ..cli import build_parser

    print(script(build_parser(), args.shell), end="")
    return 0
