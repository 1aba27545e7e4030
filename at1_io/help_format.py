"""`--help` that shows every option's default, as the project's command lines promise."""

from __future__ import annotations

import argparse
import copy


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to each option that has a default, with or without help text.

    argparse's ArgumentDefaultsHelpFormatter skips options without help text and prints
    "(default: None)", "(default: False)" and "(default: )" for optional values, switches
    and empty strings.
    """

    def _format_action(self, action: argparse.Action) -> str:
        default = action.default
        shown = (
            action.option_strings
            and action.help is not argparse.SUPPRESS
            and default is not None
            and default is not argparse.SUPPRESS
            and not isinstance(default, bool)
            and default not in ([], "")
            and "%(default)" not in (action.help or "")
        )
        if shown:
            action = copy.copy(action)
            action.help = f"{action.help or ''} (default: %(default)s)".lstrip()
        return super()._format_action(action)
