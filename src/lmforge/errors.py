"""The one exception type a user sees: a message that names the problem and the fix."""


class LmforgeError(Exception):
    """A user mistake or bad input. The CLI prints it as one line and exits with status 2."""


def did_you_mean(names, choices) -> str:
    """" (did you mean 'lr'?)" for the closest of `choices` to each of `names` (a typo), or ""."""
    import difflib

    close = [match[0] for name in ([names] if isinstance(names, str) else names)
             for match in [difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)] if match]
    return f" (did you mean {', '.join(map(repr, dict.fromkeys(close)))}?)" if close else ""


def shell_join(words) -> str:
    """`words` as one command line to paste into a shell: each quoted where it needs it, one holding a
    newline or another control character in bash's $'...' form (which keeps the command on one line)."""
    import re
    import shlex

    def quoted(word: str) -> str:
        if not re.search(r"[\x00-\x1f\x7f]", word):
            return shlex.quote(word)
        escaped = re.sub(r"[\\'\x00-\x1f\x7f]", lambda m: {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t"}.get(
            m.group(), f"\\x{ord(m.group()):02x}"), word)
        return f"$'{escaped}'"

    return " ".join(quoted(str(w)) for w in words)
