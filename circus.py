#!/usr/bin/env python3
"""circus.py: a process and socket manager in one file.

Runs Circus 0.19 configs unchanged, speaks Circus's ZeroMQ protocol (the real
``circusctl`` drives it, and its ``ctl`` drives a real ``circusd``), and sees
child deaths the moment they happen (pidfd / SIGCHLD), not on a polling tick.

Use::

    python circus.py daemon circus.ini      # run the daemon
    python circus.py ctl status             # talk to it

or from Python::

    import circus
    arbiter = circus.get_arbiter([{"name": "web", "cmd": "python -m http.server"}])
    arbiter.run()

Public API (``__all__``): Process, Watcher, Arbiter, get_arbiter, Client,
subscribe, load_config, default_endpoint, Plugin, CircusError, ConfigError,
CommandError, MessageError, and the stream classes.

Sections, in order (each uses only what is above it; the appendix fills a
table the dashboard reads at run time):
 1. Header and lazy imports       12. Command table
 2. Constants, states, errors     13. Plugins
 3. Pure helpers                  14. Arbiter
 4. Config: options, objects      15. ZeroMQ channels (control, pub/sub)
 5. Sockets                       16. Client and ctl
 6. Streams and logging           17. HTTP server
 7. Supervisor's format           18. /metrics
 8. Reading a config file         19. Web dashboard
 9. Process                       20. Channels, started for the Arbiter
10. Watcher                       21. CLI (daemon, ctl, web, argv dispatch)
11. Monitoring                    22. Appendix: the dashboard's page
"""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import sys
import time
import weakref

__version__ = "0.1.0"
#: The Circus release whose protocol and config format we speak.
CIRCUS_COMPAT = "0.19.0"

__all__ = [
    "Process", "Watcher", "Arbiter", "get_arbiter", "Client", "subscribe", "load_config",
    "default_endpoint", "client_keys", "Plugin",
    "CircusError", "ConfigError", "CommandError", "MessageError",
    "StdoutStream", "StderrStream", "FancyStdoutStream", "JSONStdoutStream", "PrefixStdoutStream",
    "FileStream", "WatchedFileStream", "TimedRotatingFileStream", "QueueStream",
]


class _LazyModule:
    """A module imported on first attribute access.

    ``ctl`` must start fast: it needs zmq and json only, so asyncio, psutil,
    subprocess and logging are imported when the daemon side first uses them.
    """

    def __init__(self, name: str):
        self.__dict__["_name"] = name

    def __getattr__(self, attr):
        import importlib
        mod = importlib.import_module(self.__dict__["_name"])
        self.__dict__.update(mod.__dict__)
        return getattr(mod, attr)


asyncio = _LazyModule("asyncio")
subprocess = _LazyModule("subprocess")
logging = _LazyModule("logging")
_psutil = _LazyModule("psutil")

HAS_PIDFD = hasattr(os, "pidfd_open") and sys.platform.startswith("linux")


def _log():
    return logging.getLogger("circus")


# ---------------------------------------------------------------------------
# 2. Constants, states, errors
# ---------------------------------------------------------------------------

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_PUBSUB = "tcp://127.0.0.1:5556"
# (Circus's stats and multicast defaults, tcp://127.0.0.1:5557 and
# udp://237.219.251.97:12027, are not ours: private ipc, and no discovery.)

class ProcState:
    """The one set of states, of a process and of a watcher (Supervisor's names).

    A watcher moves between STOPPED, STARTING, RUNNING and STOPPING, and also
    WAITING (for what it depends on: depends_on) and DONE (a oneshot that ran to
    completion); Circus's view of it (`status`, events) is derived: CIRCUS_STATUS.
    """
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"
    WAITING = "WAITING"     # watchers only: depends_on not ready yet
    DONE = "DONE"           # watchers only: a oneshot's processes all exited 0


#: A watcher's state as Circus shows it, on the wire (`status`, events).
CIRCUS_STATUS = {ProcState.STOPPED: "stopped", ProcState.STARTING: "starting",
                 ProcState.RUNNING: "active", ProcState.STOPPING: "stopping",
                 ProcState.WAITING: "waiting", ProcState.DONE: "done"}


# Error numbers of the control protocol (Circus's commands/errors.py values).
E_NOT_SPECIFIED, E_INVALID_JSON, E_UNKNOWN_COMMAND, E_MESSAGE_ERROR = 0, 1, 2, 3
E_OS_ERROR, E_COMMAND_ERROR, E_BAD_MSG_DATA = 4, 5, 6


class CircusError(Exception):
    """Root of every error circus.py raises on purpose."""


class ConfigError(CircusError):
    """A config file, section or value is wrong; the text says where and how."""


class CommandError(CircusError):
    """A control command failed; carries the protocol errno."""

    errno = E_COMMAND_ERROR

    def __init__(self, reason: str, errno_: int | None = None):
        super().__init__(reason)
        if errno_ is not None:
            self.errno = errno_


class MessageError(CommandError):
    """A request is malformed or names something that does not exist (errno 3)."""

    errno = E_MESSAGE_ERROR


# ---------------------------------------------------------------------------
# 3. Pure helpers
# ---------------------------------------------------------------------------

_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


def to_bool(value) -> bool:
    """Circus/configparser booleans: yes/true/on/1 and no/false/off/0, any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("%r is not a boolean (use true/false, yes/no, on/off, 1/0)" % (value,))


def to_int(value) -> int:
    if isinstance(value, bool):
        raise ValueError("%r is not an integer" % (value,))
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError("%r is not an integer" % (value,)) from None


def to_float(value) -> float:
    if isinstance(value, bool):
        raise ValueError("%r is not a number" % (value,))
    try:
        return float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ValueError("%r is not a number" % (value,)) from None


def ranged(conv, lo=None, hi=None, span=None):
    """``conv`` then a range check: a converter for the option tables, so a value
    that would only fail later (a umask of 10**20, a port of 70000, nan seconds)
    is refused where it is read. ``span`` words the range when numbers don't."""
    import math

    def check(value):
        v = conv(value)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("%r is not a finite number" % (value,))
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            text = span or ("%s to %s" % (lo, hi) if lo is not None and hi is not None
                            else "%s or more" % lo if lo is not None else "%s or less" % hi)
            raise ValueError("%s is out of range (use %s)" % (value, text))
        return v
    return check


def to_signum(value) -> int:
    """A signal given as a number, a name with or without SIG in any case, or RTMIN+n."""
    if isinstance(value, bool):
        raise ValueError("%r is not a signal" % (value,))
    if isinstance(value, int):
        if 0 < value < getattr(signal, "NSIG", 65):
            return value
        raise ValueError("%r is not a signal number" % (value,))
    text = str(value).strip().upper()
    if text.isdigit():
        return to_signum(int(text))
    if not text.startswith("SIG"):
        text = "SIG" + text
    m = re.fullmatch(r"SIG(RTMIN|RTMAX)([+-]\d+)?", text)
    if m and hasattr(signal, "SIGRTMIN"):
        base = signal.SIGRTMIN if m.group(1) == "RTMIN" else signal.SIGRTMAX
        num = int(base) + int(m.group(2) or 0)
        if signal.SIGRTMIN <= num <= signal.SIGRTMAX:   # else kill() fails with EINVAL
            return num
        raise ValueError("%r is not a real-time signal here: use RTMIN+0 to RTMIN+%d"
                         % (value, signal.SIGRTMAX - signal.SIGRTMIN))
    num = getattr(signal, text, None)
    if isinstance(num, signal.Signals):
        return int(num)
    raise ValueError("%r is not a signal name (e.g. TERM, SIGHUP, 15)" % (value,))


def signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


def exit_code_of(status: int) -> int:
    """A wait status as Circus reports it: the exit code, or minus the signal."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return status


def describe_exit(code: int) -> str:
    return "killed by %s" % signame(-code) if code < 0 else "exit code %d" % code


def exit_status(code: int) -> int:
    """A returncode as a shell reports it: the code, or 128+N when signal N killed it."""
    return 128 - code if code < 0 else code


_CIRCUS_VAR = re.compile(r"(?:\$\(|\(\()circus\.([\w.\-]+)(?:\)\)|\))", re.IGNORECASE)


def replace_circus_vars(text: str, table: dict) -> str:
    """Expand ``$(circus.KEY)`` and ``((circus.KEY))``; case-insensitive keys.

    ``table`` maps lower-case keys (``wid``, ``env.home``, ``sockets.web``) to
    values; unknown keys are left untouched, as Circus does.
    """
    if "circus" not in text.lower():
        return text

    def sub(m):
        val = table.get(m.group(1).lower())
        return m.group(0) if val is None else str(val)
    return _CIRCUS_VAR.sub(sub, text)


_ENV_REF = re.compile(r"\$([A-Z][A-Z0-9_]*)")


def expand_env_refs(text: str, environ) -> str:
    """``$NAME`` inside ``[env]`` values, from the daemon's own environment."""
    return _ENV_REF.sub(lambda m: environ.get(m.group(1), ""), text)


# An environment file (environment_file): systemd's EnvironmentFile= syntax, with
# docker-compose's trailing comments on unquoted values.
_ENV_ASSIGN = re.compile(r"[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*")
_ENV_QUOTED = {'"': re.compile(r'"((?:[^"\\]|\\.)*)"', re.S), "'": re.compile(r"'([^']*)'")}
_ENV_AFTER_QUOTE = re.compile(r"[ \t]*(?:#[^\n]*)?(?:\n|\Z)")


def _env_unescape(text: str) -> str:
    """Double quotes: \\" \\\\ \\$ \\` stand for the character, a backslash before a newline
    joins the lines; any other backslash is kept (systemd's rules)."""
    return re.sub(r'\\(\n|["\\`$])', lambda m: "" if m.group(1) == "\n" else m.group(1), text)


def _env_line_error(line: str) -> str:
    name = line.split("=", 1)[0].strip()
    if "=" not in line:
        return "%r has no '=': write NAME=value (a comment starts with #)" % line[:60]
    return "%r is not a variable name (letters, digits and _, not starting with a digit)" % name[:60]


def parse_env_file(text: str, path: str) -> dict:
    """The ``NAME=value`` lines of an environment file; ValueError ``path:line: why``.

    Blank lines and lines starting with ``#`` are skipped; ``export`` before a
    name is allowed. An unquoted value is trimmed and ends at `` #`` (a ``#``
    inside a word stays); a double-quoted one takes backslash escapes, a
    single-quoted one is literal; both may span lines, and only a comment may
    follow the closing quote. No ``$VAR`` expansion: values are taken as written.
    """
    if "\0" in text:
        raise ValueError("%s: holds a NUL byte: not a text file of NAME=value lines" % path)
    text = text.replace("\r\n", "\n")
    out, pos, line = {}, 0, 1
    while pos < len(text):
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        body = text[pos:end].strip()
        nxt = end + 1
        if body and not body.startswith("#"):
            m = _ENV_ASSIGN.match(text, pos, end)
            if not m:
                raise ValueError("%s:%d: %s" % (path, line, _env_line_error(body)))
            quote = text[m.end():m.end() + 1]
            if quote in _ENV_QUOTED:
                value, nxt = _env_quoted(text, m, quote, "%s:%d" % (path, line))
            else:
                value = re.split(r"[ \t]#", text[m.end():end], maxsplit=1)[0].strip()
            out[m.group(1)] = value
        line += text.count("\n", pos, nxt)
        pos = nxt
    return out


def _env_quoted(text: str, m, quote: str, where: str):
    """The quoted value after assignment ``m``, and where the next line starts."""
    v = _ENV_QUOTED[quote].match(text, m.end())
    if not v:
        raise ValueError("%s: the %s quote of %s's value is never closed" % (where, quote, m.group(1)))
    after = _ENV_AFTER_QUOTE.match(text, v.end())
    if not after:
        junk = text[v.end():].split("\n", 1)[0].strip()
        raise ValueError("%s: %r after the closing quote of %s's value: quote the whole value "
                         "(a comment after it starts with #)" % (where, junk[:40], m.group(1)))
    return (v.group(1) if quote == "'" else _env_unescape(v.group(1))), after.end()


def human_size(n) -> str:
    """Circus's size format: ``512B``, ``1.50K``, ``3.20M``..."""
    try:
        n = float(n)
    except (TypeError, ValueError):
        return "N/A"
    if n < 1024:
        return "%dB" % n
    for unit in "KMGTPEZ":
        n /= 1024.0
        if n < 1024 or unit == "Z":
            return "%.2f%s" % (n, unit)
    return "%.2f%s" % (n, "Z")


def human_cputime(seconds: float) -> str:
    """CPU time as ``M:SS.cc``."""
    minutes, sec = divmod(seconds, 60)
    return "%d:%05.2f" % (minutes, sec)


def parse_octal(value) -> int:
    text = str(value).strip()
    try:
        return int(text, 8)
    except ValueError:
        raise ValueError("%r is not an octal mode (e.g. 022)" % (value,)) from None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: an address only this machine reaches."""
    import ipaddress
    host = (host or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token(token) -> None:
    """A dashboard token must be long enough to resist guessing: ValueError if not."""
    if token is not None and len(token) < 16:
        raise ValueError("httpd_token is too short: use 16 characters or more, e.g. from "
                         "python -c 'import secrets; print(secrets.token_urlsafe())'")


def private_dir() -> str:
    """Where the default ipc endpoints live: $XDG_RUNTIME_DIR/circus, /run/circus for
    root, else /tmp/circus-<uid>. Only its owner may enter it (see ensure_private_dir)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "circus")
    if os.geteuid() == 0 and os.path.isdir("/run"):
        return "/run/circus"
    return "/tmp/circus-%d" % os.geteuid()


def default_endpoint(kind: str) -> str:
    """``ipc://<private dir>/<kind>.sock`` for kind control, pubsub or stats."""
    return "ipc://%s/%s.sock" % (private_dir(), kind)


def ensure_private_dir(path: str) -> None:
    """Create ``path`` 0700, or check an existing one is ours and 0700 (never trust another's)."""
    import stat
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise CircusError("%s must be a folder of yours with mode 0700 (it holds the control "
                          "socket): fix its owner and mode, or remove it" % path)


def import_dotted(path: str, extra_dirs=()):
    """Import ``pkg.mod.Name``; ``extra_dirs`` are tried first (the config's folder)."""
    import importlib
    if "." not in path:
        raise ImportError("%r is not a dotted path (package.module.Name)" % path)
    modname, attr = path.rsplit(".", 1)
    for d in extra_dirs:
        if d and d not in sys.path:
            sys.path.insert(0, d)
    mod = importlib.import_module(modname)
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ImportError("module %r has no %r" % (modname, attr)) from None


def parse_exitcodes(value) -> list:
    codes = []
    for part in str(value).split(","):
        part = part.strip()
        if part:
            code = to_int(part)
            if not 0 <= code <= 255:
                raise ValueError("exit code %d is not in 0..255" % code)
            codes.append(code)
    return codes


def parse_autorestart(value) -> str:
    text = str(value).strip().lower()
    if text == "unexpected":
        return text
    return "true" if to_bool(text) else "false"


def parse_mem_limit(value) -> int:
    """``200M``, ``1.5G``, ``512K``, ``1048576`` (bytes) or ``25%`` of the machine's memory."""
    text = str(value).strip().upper()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(%|B|K|KB|M|MB|G|GB|T|TB)?", text)
    if not m:
        raise ValueError("%r is not a memory size (e.g. 200M, 1G, 25%%)" % (value,))
    num, unit = ranged(float)(m.group(1)), (m.group(2) or "B").rstrip("B") or "B"
    if unit == "%":
        return int(_psutil.virtual_memory().total * num / 100)
    return int(num * {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])


# -- users: who a process or the daemon runs as -------------------------------


def resolve_user(uid, gid):
    """Names or numbers -> (uid, gid, supplementary groups); clear errors."""
    import grp
    import pwd
    out_uid = out_gid = groups = None
    if uid is not None and str(uid) != "":
        try:
            pw = pwd.getpwuid(int(uid)) if str(uid).isdigit() else pwd.getpwnam(str(uid))
        except KeyError:
            raise ValueError("unknown user %r" % (uid,)) from None
        out_uid = pw.pw_uid
        out_gid = pw.pw_gid
        try:
            groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
        except OSError:
            groups = None
    if gid is not None and str(gid) != "":
        try:
            out_gid = int(gid) if str(gid).isdigit() else grp.getgrnam(str(gid)).gr_gid
        except KeyError:
            raise ValueError("unknown group %r" % (gid,)) from None
    return out_uid, out_gid, groups


def drop_privileges(user):
    """Become ``user`` (name or uid) with its groups: [supervisord] user."""
    uid, gid, groups = resolve_user(user, None)
    if uid == os.geteuid():
        return
    import importlib    # the interpreter may live where the new user cannot read: import now
    for mod in ("shlex", "subprocess", "heapq", "random", "glob", "fnmatch", "tempfile", "resource",
                "grp", "pwd", "traceback", "platform", "queue", "threading", "collections", "psutil",
                "logging.handlers", "logging.config", "urllib.parse", "json", "socket", "struct"):
        importlib.import_module(mod)
    try:
        if groups is not None:
            os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    except OSError as e:
        raise CircusError("cannot switch to user %r: %s (the daemon must start as root)"
                          % (user, e.strerror)) from None


# -- CurveZMQ key files: checked by the config, loaded by the daemon and ctl ----------


def load_curve_key(path: str, secret=False) -> tuple:
    """(public, secret) z85 keys from a key file written by `ctl keygen` (zmq.auth's format)."""
    import zmq.auth
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise CircusError("cannot read CurveZMQ key %s: %s (create one with `python circus.py "
                          "ctl keygen`)" % (path, getattr(e, "strerror", None) or e)) from None
    if secret and not secret_key:
        raise CircusError("%s holds no secret key: give the .key_secret file, not the public "
                          ".key" % path)
    return public, secret_key


def _key_files(location: str) -> list:
    if os.path.isdir(location):
        return sorted(e.path for e in os.scandir(location) if e.name.endswith(".key") and e.is_file())
    return [location] if os.path.exists(location) else []


def authorized_keys(location: str, problems=None) -> set:
    """The public keys (z85) of a folder of .key files, or of one key file.

    With a ``problems`` list, unreadable files are skipped and described
    there; without it the first one raises CircusError.
    """
    if not os.path.exists(location):
        if problems is None:
            raise CircusError("curve_authorized_keys %s does not exist" % location)
        problems.append("%s does not exist: no client is let in" % location)
        return set()
    keys = set()
    for path in _key_files(location):
        try:
            keys.add(load_curve_key(path)[0])
        except CircusError as e:
            if problems is None:
                raise
            problems.append(str(e))
    return keys


# ---------------------------------------------------------------------------
# 4. Config: options, converters, the config objects
# ---------------------------------------------------------------------------
# An INI reader with Circus's dialect (first definition wins, `#` inline is
# data, `;` inline after white space is a comment, case kept), then typed,
# validated config objects. Nothing here binds a socket or starts a process.

class _Where:
    """Where a value came from, for error lines: ``file:line [section] key``."""
    __slots__ = ("file", "line", "section", "key")

    def __init__(self, file, line, section, key=None):
        self.file, self.line, self.section, self.key = file, line, section, key

    def __str__(self):
        out = "%s:%s [%s]" % (self.file, self.line, self.section)
        return out + (" %s" % self.key if self.key else "")


class IniFile:
    """Sections in file order; each maps key -> (value, _Where)."""

    _SECTION = re.compile(r"^\[(?P<name>.+)\]\s*$")
    _OPTION = re.compile(r"^(?P<key>[^=:]*?)\s*(?P<sep>[=:])\s*(?P<value>.*)$")

    def __init__(self):
        self.sections: dict = {}
        self.files: list = []

    @staticmethod
    def _file_text(path: str) -> str:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise ConfigError("%s: cannot read config file: %s" % (path, e.strerror or e)) from None
        except UnicodeDecodeError as e:
            raise ConfigError("%s: not UTF-8 text (%s)" % (path, e.reason)) from None

    def read(self, path: str, text: str | None = None) -> None:
        if text is None:
            text = self._file_text(path)
        self.files.append(path)
        section = key = None
        sv = False
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.rstrip()
            stripped = line.strip()
            if not stripped or stripped[0] in "#;":
                continue
            if raw[0] in " \t" and key is not None:
                # continuation line: joined to the previous value with a newline
                value, where = section[key]
                section[key] = (value + "\n" + _strip_inline_comment(stripped, "#;" if sv else ";"), where)
                continue
            m = self._SECTION.match(_strip_inline_comment(stripped, "#;"))
            if stripped[0] == "[" and not m:    # not a key: `[watcher:x` once read as `[watcher` = `x`
                raise ConfigError("%s:%d: malformed section header %r (expected [name], closed by ']')"
                                  % (path, lineno, stripped))
            if m:
                name = m.group("name").strip()
                section = self.sections.setdefault(name, {})
                key = None
                sv = is_supervisor_section(name)
                section.setdefault("__where__", (None, _Where(path, lineno, name)))
                continue
            if section is None:
                raise ConfigError("%s:%d: option outside any section: %r (start the file "
                                  "with a [section] header)" % (path, lineno, stripped))
            key = self._option(section, sv, _Where(path, lineno, self._section_name(section)), stripped)

    def _option(self, section, sv, where, line):
        """Store one ``key = value`` line; returns the key (None: a repeated key, skipped)."""
        m = self._OPTION.match(line)
        if not m or not m.group("key"):
            raise ConfigError("%s:%d: cannot parse %r (expected 'key = value')"
                              % (where.file, where.line, line))
        key = m.group("key")
        if sv:      # Supervisor's dialect: keys lower-cased, `#` comments too, last one wins
            key = key.lower()
            value = _strip_inline_comment(m.group("value"), "#;")
        else:
            value = _strip_inline_comment(m.group("value"))
            if value == '""':
                value = ""
            if key in section:        # first definition wins, as in Circus
                return None
        where.key = key
        section[key] = (value, where)
        return key

    def _section_name(self, section):
        return section["__where__"][1].section

    def items(self, name):
        """key -> value of one section, without the bookkeeping entry."""
        return {k: v[0] for k, v in self.sections.get(name, {}).items() if k != "__where__"}

    def where(self, name, key=None):
        sec = self.sections.get(name, {})
        if key is not None and key in sec:
            return sec[key][1]
        w = sec.get("__where__", (None, _Where("?", "?", name)))[1]
        return _Where(w.file, w.line, name, key)


def _strip_inline_comment(value: str, chars=";") -> str:
    m = re.search(r"\s[%s]" % chars, value)
    return (value[:m.start()] if m else value).strip()


_SV_PREFIXES = ("program:", "group:", "fcgi-program:", "eventlistener:", "rpcinterface:",
                "ctlplugin:", "unix_http_server", "inet_http_server")


def is_supervisor_section(name: str) -> bool:
    """Sections of Supervisor's format (read with its dialect and translated)."""
    return name in ("supervisord", "supervisorctl", "include") or name.startswith(_SV_PREFIXES)


def _number(value):
    """int when the text is an integer, else float (warmup_delay, graceful_timeout)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        return to_float(text)


def _str_or_none(value):
    return None if value is None else str(value)


def _names(value) -> list:
    """``a, b`` (or a JSON list) -> ["a", "b"]: depends_on."""
    items = value if isinstance(value, (list, tuple)) else re.split(r"[,\s]+", str(value or ""))
    return [str(n).strip() for n in items if str(n).strip()]


def _mode(value) -> int:
    """A umask or file mode: an int as it is (JSON), text as octal (``022``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return parse_octal(value)


# Range-checked converters for the tables below, the Supervisor keys and `set`.
_count = ranged(to_int, 0)                      # numprocesses, max_age, backups...
_seconds = ranged(to_float, 0)                  # timeouts and delays
_delay = ranged(_number, 0)                     # warmup_delay: int stays int
_port = ranged(to_int, 0, 65535)
_umask = ranged(_mode, 0, 0o777, "000 to 777, octal")
_priority = ranged(to_int, -(2 ** 31 - 1), 2 ** 31 - 1)
_backlog = ranged(to_int, 0, 2 ** 31 - 1)
_rlimit = ranged(to_int, -1, 2 ** 63 - 1, "-1 for unlimited, or 0 to 2**63-1")


def _text(value) -> str:
    if not isinstance(value, str):
        raise ValueError("%r is not a string" % (value,))
    return value


def _pairs(sep):
    """``A=1,B=2`` as a dict (``sep`` between name and value); parts without ``sep`` are dropped."""
    return lambda value: dict(kv.split(sep, 1) for kv in value.split(",") if sep in kv)


#: The kinds of plain value a control message's properties and ctl's words are
#: converted to; the config's option tables build on the same converters.
VALUE_KINDS = {int: to_int, float: to_float, bool: to_bool, str: _text, "signal": to_signum,
               "env": _pairs("="), "hooks": _pairs(":")}

#: The kind circusctl sends each `set` value as (so a real circusd takes ours); other keys: text.
_SET_KINDS = {
    "numprocesses": int, "max_retry": int, "max_age": int, "max_age_variance": int,
    "stdout_stream.max_bytes": int, "stdout_stream.backup_count": int,
    "stderr_stream.max_bytes": int, "stderr_stream.backup_count": int,
    "warmup_delay": float, "retry_in": float, "graceful_timeout": float,
    "send_hup": bool, "shell": bool, "copy_env": bool, "respawn": bool, "stop_children": bool,
    "close_child_stdin": bool, "close_child_stdout": bool, "close_child_stderr": bool,
    "singleton": bool, "stop_signal": "signal", "env": "env", "hooks": "hooks",
}


def convert_value(kind, value):
    """``value`` as ``kind`` (a VALUE_KINDS key; None: as it is). Raises ValueError."""
    return value if kind is None else VALUE_KINDS[kind](value)


def set_value_kind(key: str):
    """The kind a `set` value travels as, for convert_value()."""
    return int if key.startswith("rlimit_") else _SET_KINDS.get(key)


_SUN_PATH_MAX = 107     # bytes in a unix socket's path (sun_path, less its NUL)


def zmq_endpoint(value) -> str:
    """``ipc://PATH`` or ``tcp://HOST:PORT`` (empty: none), checked before anything binds."""
    text = str(value).strip()
    if not text:
        return text
    if text.startswith("ipc://"):
        path = text[6:]
        if not path or "\0" in path:
            raise ValueError("%r has no socket path (ipc:///run/app/control.sock)" % text)
        if path.startswith("@"):
            raise ValueError("%r is an abstract socket, which has no file permissions: any "
                             "local user could connect; use a path in a folder of yours" % text)
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise ValueError("%r: the path is longer than a unix socket allows (%d bytes)"
                             % (text, _SUN_PATH_MAX))
        return text
    m = re.fullmatch(r"tcp://(\[[0-9A-Fa-f:.%\w]+\]|[^\s:/\[\]]+):(\*|\d+)", text)
    if not m:
        raise ValueError("%r is not an endpoint: use ipc://PATH or tcp://HOST:PORT" % text)
    if m.group(2) != "*":
        _port(m.group(2))
    return text


def host_port(value) -> str:
    """``HOST:PORT`` of an HTTP endpoint (metrics_endpoint); HOST may be [IPv6]."""
    text = str(value).strip()
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.%\w]+\]|[^\s:/\[\]]*):(\d+)", text)
    if not m:
        raise ValueError("%r is not HOST:PORT (e.g. 127.0.0.1:9131)" % text)
    _port(m.group(2))
    return text


def udp_group(value) -> str:
    """``udp://GROUP[:PORT]``, GROUP an IPv4 multicast address (multicast_endpoint)."""
    import ipaddress
    text = str(value).strip()
    if not text:
        return text
    m = re.fullmatch(r"udp://([\d.]+)(?::(\d+))?", text)
    try:
        ok = m is not None and ipaddress.IPv4Address(m.group(1)).is_multicast
    except ValueError:
        ok = False
    if not ok:
        raise ValueError("%r: use udp://GROUP:PORT with a multicast GROUP (224.0.0.0 to "
                         "239.255.255.255), e.g. udp://237.219.251.97:12027" % text)
    if m.group(2):
        _port(m.group(2))
    return text


def _ready_mode(value):
    text = str(value).strip().lower()
    if text == "notify" and not sys.platform.startswith("linux"):
        raise ValueError("ready = notify needs Linux (it reads the sender's pid from the socket); "
                         "use listen or a delay")
    if text in ("notify", "listen"):
        return text
    try:
        delay = float(text)
    except ValueError:
        raise ValueError("ready: %r is not notify, listen or a number of seconds" % (value,)) from None
    return _seconds(delay)


def _death_signal(value) -> int:
    if str(value).strip().lower() in ("none", "off", "false", "no", "0", ""):
        return 0
    return to_signum(value)


def _env_file_spec(value):
    """``PATH[, -PATH...]`` (environment_file), checked and written one way; None: none."""
    if value is None or not str(value).strip():
        return None
    parts = [p.strip() for p in str(value).split(",")]
    if not all(p.lstrip("-").strip() for p in parts):
        raise ValueError("%r: an empty path; list files as PATH, -OPTIONAL_PATH" % (value,))
    return ", ".join(parts)


def _args(value):
    if value is None or isinstance(value, list):
        return value
    return str(value)


# -- cron schedules: `cron` and `restart_cron` -------------------------------------

_CRON_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
#: The five fields: name, lowest and highest value, names (the first one is `lowest`).
_CRON_FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day-of-month", 1, 31, ()),
                ("month", 1, 12, _CRON_MONTHS), ("day-of-week", 0, 7, _CRON_DAYS))
_CRON_ALIASES = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
                 "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *",
                 "@annually": "0 0 1 1 *"}
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _cron_value(text, field) -> int:
    name, lo, hi, names = field
    if text.lower() in names:
        return names.index(text.lower()) + lo
    if not text.isdecimal():
        raise ValueError("%s field %r is not a number%s" % (
            name, text, " or a name (%s-%s)" % (names[0], names[-1]) if names else ""))
    if not lo <= int(text) <= hi:
        raise ValueError("%s field '%s' out of range %d-%d" % (name, text, lo, hi))
    return int(text)


def _cron_field(text, field) -> set:
    """One field's values: `*`, N, A-B, with /STEP (N/STEP: N to the highest), lists of them."""
    name, lo, hi = field[:3]
    out = set()
    for part in text.split(","):
        span, _, step = part.partition("/")
        if step and not (step.isdecimal() and int(step) > 0):
            raise ValueError("%s field %r: the step after '/' must be a number of 1 or more" % (name, part))
        if span == "*":
            first, last = lo, (6 if name == "day-of-week" else hi)     # 7 is Sunday again
        elif "-" in span:
            first, last = (_cron_value(v, field) for v in span.split("-", 1))
            if first > last:
                raise ValueError("%s field %r: the range goes backwards" % (name, part))
        else:
            first = _cron_value(span, field)
            last = hi if step else first
        out.update(range(first, last + 1, int(step or 1)))
    return out


class CronSpec:
    """A cron schedule, ``MIN HOUR DOM MON DOW`` (or @daily...), parsed; ValueError names
    the bad field. Days follow cron's rule: when both day fields are restricted (neither
    starts with `*`), a day matches if either does; else it must match both."""

    def __init__(self, text: str):
        words = _CRON_ALIASES.get(text.strip().lower(), text).split()
        if len(words) != 5:
            raise ValueError("%r has %d fields: use MIN HOUR DOM MON DOW (e.g. '30 3 * * *' for "
                             "03:30 every day) or @hourly/@daily/@weekly/@monthly/@yearly"
                             % (text, len(words)))
        fields = [_cron_field(w, f) for w, f in zip(words, _CRON_FIELDS)]
        self.minutes, self.hours = sorted(fields[0]), sorted(fields[1])
        self.doms, self.months = fields[2], fields[3]
        self.dows = {d % 7 for d in fields[4]}
        self.either_day = not words[2].startswith("*") and not words[4].startswith("*")
        if not self.either_day and not any(d <= _MONTH_DAYS[m - 1] for m in self.months for d in self.doms):
            raise ValueError("%r never runs: no month chosen has that day" % text)

    def day_matches(self, day) -> bool:
        dom, dow = day.day in self.doms, day.isoweekday() % 7 in self.dows
        return (dom or dow) if self.either_day else (dom and dow)

    def next_after(self, when):
        """The first matching minute after ``when`` (naive local datetimes); None if
        none within 9 years (only a 29 February can be that far)."""
        import datetime as dt
        start = when.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        day = start.date()
        for _ in range(9 * 366):
            if day.month in self.months and self.day_matches(day):
                for h in self.hours:
                    for m in self.minutes:
                        cand = dt.datetime(day.year, day.month, day.day, h, m)
                        if cand >= start:
                            return cand
            day += dt.timedelta(days=1)
        return None


def _cron(value):
    """A cron schedule, checked; kept as its text (None: none)."""
    if value is None or str(value).strip() == "":
        return None
    text = " ".join(str(value).split())
    CronSpec(text)
    return text


_HEALTH_ADDR = re.compile(r"(http|tcp)://(\[[0-9A-Fa-f:.%\w]+\]|[^\s:/\[\]]+):(\d+)(/\S*)?")
_HEALTH_FORMS = "use http://HOST:PORT/PATH, tcp://HOST:PORT or exec:COMMAND"


def health_target(text: str) -> tuple:
    """A health_check, expanded: ("http", host, port, path), ("tcp", host, port, None)
    or ("exec", command, None, None). ValueError names the forms."""
    text = str(text).strip()
    if text.startswith("exec:"):
        if not text[5:].strip():
            raise ValueError("%r: exec: needs a command, e.g. exec:pg_isready -q" % text)
        return "exec", text[5:].strip(), None, None
    m = _HEALTH_ADDR.fullmatch(text)
    if not m or (m.group(1) == "tcp" and m.group(4)):
        hint = " (for https: exec:curl -fsS https://...)" if text.startswith("https:") else ""
        raise ValueError("%r: %s%s" % (text, _HEALTH_FORMS, hint))
    port = _port(m.group(3))
    return m.group(1), m.group(2).strip("[]"), port, m.group(4) or ("/" if m.group(1) == "http" else None)


def _health_check(value):
    """Checked at load; one with $(circus.X) in its address is checked again per process."""
    text = str(value).strip()
    if not text:
        return None
    if _CIRCUS_VAR.search(text) and not text.startswith("exec:"):
        if not text.startswith(("http://", "tcp://")):
            raise ValueError("%r: %s" % (text, _HEALTH_FORMS))
        return text
    health_target(text)
    return text


def _health_action(value) -> str:
    text = str(value).strip()
    if text.lower() in ("restart", "stop", "exit"):
        return text.lower()
    if text.lower().startswith("signal:"):
        return "signal:" + signame(to_signum(text[7:]))
    raise ValueError("%r: use restart, stop, exit or signal:NAME (e.g. signal:USR1)" % (value,))


#: Watcher options: name -> (converter, default). One table serves the INI
#: parser, `add`, `set`, `options` and `get`.
WATCHER_OPTIONS = {
    "cmd": (str, None),
    "args": (_args, ""),
    "numprocesses": (_count, 1),
    "warmup_delay": (_delay, 0),
    "executable": (_str_or_none, None),
    "working_dir": (_str_or_none, None),
    "shell": (to_bool, False),
    "shell_args": (_str_or_none, None),
    "uid": (_str_or_none, None),
    "gid": (_str_or_none, None),
    "send_hup": (to_bool, False),
    "stop_signal": (to_signum, int(signal.SIGTERM)),
    "stop_children": (to_bool, False),
    "max_retry": (ranged(to_int, -1), 5),     # -1: retry forever
    # longest delay between failed starts (jittered); None: the policy's own cap
    "backoff_max": (lambda v: None if v in (None, "") else ranged(to_float, 0.1)(v), None),
    "graceful_timeout": (_seconds, 30.0),
    "priority": (_priority, 0),
    "singleton": (to_bool, False),
    "use_sockets": (to_bool, False),
    "copy_env": (to_bool, False),
    "copy_path": (to_bool, False),
    # files of NAME=value lines, read at (re)load into WatcherConfig.env_file; "-PATH": optional
    "environment_file": (_env_file_spec, None),
    "on_demand": (to_bool, False),
    "respawn": (to_bool, True),
    "autostart": (to_bool, True),
    "max_age": (_count, 0),
    "max_age_variance": (_count, 30),
    "close_child_stdin": (to_bool, True),
    "close_child_stdout": (to_bool, False),
    "close_child_stderr": (to_bool, False),
    "virtualenv": (_str_or_none, None),
    "virtualenv_py_ver": (_str_or_none, None),
    "stdin_socket": (_str_or_none, None),
    "check_flapping": (to_bool, True),
    # schedules (local time): cron starts it at each match (not at boot), restart_cron restarts it
    "cron": (_cron, None),
    "restart_cron": (_cron, None),
    # the daemon stops everything and exits when this watcher gives up (Arbiter.critical_exit)
    "critical": (to_bool, False),
    # each process gets PORT = port_base + wid - 1 in its environment (Procfile mode)
    "port_base": (lambda v: None if v in (None, "") else _port(v), None),
    # start order: names of watchers (or Supervisor groups) that must be ready first
    "depends_on": (_names, []),
    # each process runs once to completion: exit 0 -> DONE, else retried per max_retry
    "oneshot": (to_bool, False),
    # signal for the processes if the daemon dies (Linux): default stop_signal, "none" opts out
    "parent_death_signal": (lambda v: None if v is None else _death_signal(v), None),
    # readiness: "notify" (sd_notify READY=1), "listen" (a listening socket of its own) or
    # seconds; a graceful reload waits for it before stopping the old processes
    "ready": (lambda v: None if v in (None, "") else _ready_mode(v), None),
    "ready_timeout": (_seconds, 60.0),
    # Supervisor semantics (set by [program:x]; usable in [watcher:x] too)
    "startsecs": (lambda v: None if v is None else _seconds(v), None),
    "autorestart": (lambda v: None if v is None else parse_autorestart(v), None),
    "exitcodes": (lambda v: v if isinstance(v, list) else parse_exitcodes(v), [0]),
    "stopasgroup": (to_bool, False),
    "killasgroup": (to_bool, False),
    "redirect_stderr": (to_bool, False),
    "umask": (lambda v: None if v is None else _umask(v), None),
    # resource watchdog (see Watchdog)
    "max_rss": (lambda v: None if v in (None, "") else parse_mem_limit(v), None),
    "max_cpu": (lambda v: None if v in (None, "") else ranged(to_float, 0)(v), None),
    "watchdog_interval": (_seconds, 5.0),
    "watchdog_grace": (_count, 3),
    "watchdog_signal": (lambda v: None if v in (None, "") else to_signum(v), None),
    # health checks (see HealthCheck): each process probed every health_interval once up
    "health_check": (lambda v: None if v in (None, "") else _health_check(v), None),
    "health_interval": (ranged(_seconds, 0.1, 86400), 10.0),
    "health_timeout": (ranged(_seconds, 0.01, 3600), 2.0),
    "health_failures": (ranged(to_int, 1, 1000), 3),
    "health_action": (_health_action, "restart"),
}

#: The health check keys, as both formats spell them.
HEALTH_KEYS = ("health_check", "health_interval", "health_timeout", "health_failures", "health_action")

#: The options `options`/`get` show, as circusd 0.19 does (plus free-form keys).
VISIBLE_OPTIONS = (
    "numprocesses", "warmup_delay", "working_dir", "uid", "gid", "send_hup",
    "stop_signal", "stop_children", "shell", "shell_args", "env", "max_retry",
    "cmd", "args", "respawn", "graceful_timeout", "executable", "use_sockets",
    "priority", "copy_env", "singleton", "stdout_stream_conf", "on_demand",
    "stderr_stream_conf", "max_age", "max_age_variance", "close_child_stdin",
    "close_child_stdout", "close_child_stderr",
)

HOOK_NAMES = ("before_start", "after_start", "before_spawn", "after_spawn",
              "before_stop", "after_stop", "before_signal", "after_signal",
              "before_reap", "after_reap", "extended_stats")

RLIMITS = ("as", "core", "cpu", "data", "fsize", "memlock", "msgqueue", "nice",
           "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack")

#: flapping.* keys (a watcher's, or a [plugin:x] Flapping section's) and their converters.
FLAPPING_OPTIONS = {"attempts": ranged(to_int, 1), "window": _seconds, "retry_in": _seconds,
                    "max_retry": ranged(to_int, -1), "active": to_bool}


def _rotate_when(value) -> str:
    text = str(value).strip()
    if text.upper() not in ("S", "M", "H", "D", "MIDNIGHT") and not re.fullmatch(r"W[0-6]", text.upper()):
        raise ValueError("rotate_when %r: use S, M, H, D, MIDNIGHT or W0-W6" % (value,))
    return text


_rotate_interval = ranged(to_int, 0, 2 ** 31 - 1)

#: Checks for the built-in streams' options (stdout_stream.KEY); values are kept as given.
_STREAM_CHECKS = {"max_bytes": _count, "backup_count": _count, "rotate_when": _rotate_when,
                  "rotate_interval": _rotate_interval, "utc": to_bool, "truncate": to_bool}


def convert_watcher_option(key: str, value):
    """Validate one watcher option; returns (kind, key, typed value).

    kind is "opt" (a known option), "stream" (``stdout_stream.X``), "hook",
    "rlimit" or "free" (kept as given, like Circus's free-form keys).
    Raises ValueError with a readable text.
    """
    if key in WATCHER_OPTIONS:
        conv, default = WATCHER_OPTIONS[key]
        if value is None and default in (None, ""):
            return "opt", key, default
        return "opt", key, conv(value)
    for prefix in ("stdout_stream.", "stderr_stream."):
        if key.startswith(prefix):
            check = _STREAM_CHECKS.get(key[len(prefix):])
            if check is not None and value is not None:
                check(value)
            return "stream", key, value
    if key.startswith("hooks."):
        name = key[6:]
        if name not in HOOK_NAMES:
            raise ValueError("unknown hook %r (known: %s)" % (name, ", ".join(HOOK_NAMES)))
        return "hook", name, parse_hook(value)
    if key.startswith("rlimit_"):
        res = key[7:].lower()
        if res not in RLIMITS:
            raise ValueError("unknown resource limit %r (known: %s)" % (res, ", ".join(RLIMITS)))
        if value is None or str(value).strip() == "":
            return "rlimit", res, None
        return "rlimit", res, _rlimit(value)
    return "free", key, value


def parse_hook(value):
    """``dotted.path[, ignore_failure]`` -> (path, ignore_failure)."""
    if isinstance(value, (list, tuple)):
        path, ignore = (list(value) + [False])[:2]
        return str(path), to_bool(ignore)
    parts = [p.strip() for p in str(value).split(",")]
    if len(parts) > 2 or not parts[0]:
        raise ValueError("%r: a hook is 'package.module.function[, true|false]'" % (value,))
    return parts[0], to_bool(parts[1]) if len(parts) == 2 else False


def venv_site_packages(venv, py_ver=None):
    """A virtualenv's site-packages folder for ``py_ver`` (default: ours), or None."""
    ver = py_ver or "%d.%d" % sys.version_info[:2]
    for impl in ("python", "pypy"):
        site = os.path.join(venv, "lib", impl + ver, "site-packages")
        if os.path.isdir(site):
            return site
    return None


def _pth_paths(site) -> list:
    """The existing folders the .pth files of a site-packages name (editable installs)."""
    out = []
    try:
        names = sorted(n for n in os.listdir(site) if n.endswith(".pth"))
    except OSError:
        return out
    for name in names:
        try:
            with open(os.path.join(site, name), encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.strip() and not line.startswith(("#", "import")):
                path = os.path.abspath(os.path.join(site, line.rstrip()))
                if os.path.exists(path):
                    out.append(path)
    return out


def _socket_proto(value):
    """A protocol number, or a name from /etc/protocols (``tcp``)."""
    import socket
    text = str(value).strip()
    if isinstance(value, int) or text.isdigit() or not text:
        return ranged(to_int, 0, 255)(text or 0)
    try:
        socket.getprotobyname(text)
    except OSError:
        raise ValueError("%r: use a protocol name (tcp, udp) or number" % (value,)) from None
    return text


def _socket_umask(value) -> int:
    # Circus reads the socket umask as a *decimal* number; users write it
    # either way, so a leading 0 means octal here (documented difference).
    text = str(value).strip()
    return _umask(text if text.startswith("0") else to_int(text))


def _socket_path(value):
    if value is not None and len(os.fsencode(str(value))) > _SUN_PATH_MAX:
        raise ValueError("%r is longer than a unix socket path allows (%d bytes)" % (value, _SUN_PATH_MAX))
    return value


class SocketConfig:
    """One ``[socket:NAME]`` section, typed."""

    FAMILIES = ("AF_INET", "AF_INET6", "AF_UNIX")
    TYPES = ("SOCK_STREAM", "SOCK_DGRAM", "SOCK_RAW", "SOCK_RDM", "SOCK_SEQPACKET")
    CHECKS = {"port": _port, "backlog": _backlog, "proto": _socket_proto, "umask": _socket_umask,
              "path": _socket_path, "replace": to_bool, "so_reuseport": to_bool, "blocking": to_bool}

    def __init__(self, name, host="localhost", port=8080, family="AF_INET",
                 type="SOCK_STREAM", proto=0, backlog=2048, path=None, umask=8,
                 replace=False, so_reuseport=False, blocking=False, interface=None):
        self.name = name.lower()
        self.host = host
        family = str(family).upper()
        if family not in self.FAMILIES:
            raise ValueError("family %r: use one of %s" % (family, ", ".join(self.FAMILIES)))
        type = str(type).upper()
        if type not in self.TYPES:
            raise ValueError("type %r: use one of %s" % (type, ", ".join(self.TYPES)))
        given = dict(port=port, backlog=backlog, proto=proto, umask=umask, path=path,
                     replace=replace, so_reuseport=so_reuseport, blocking=blocking)
        for key, conv in self.CHECKS.items():
            try:
                setattr(self, key, conv(given[key]))
            except ValueError as e:
                err = ValueError("%s: %s" % (key, e))
                err.key = key           # load_config points at that line
                raise err from None
        self.family = "AF_UNIX" if self.path else family
        self.type = type
        self.interface = interface

    def key(self):
        return tuple(sorted((k, v) for k, v in vars(self).items()))


class WatcherConfig:
    """One watcher, typed: options, env, hooks, rlimits, stream settings."""

    def __init__(self, name: str, options: dict | None = None):
        self.name = name
        self.options = {k: list(d) if isinstance(d, list) else d for k, (c, d) in WATCHER_OPTIONS.items()}
        self.env: dict = {}
        self.env_file: dict = {}        # what environment_file's files say (the config reader reads them)
        self.hooks: dict = {}
        self.rlimits: dict = {}
        self.stdout_stream: dict = {}
        self.stderr_stream: dict = {}
        self.free: dict = {}
        self.added = False              # created by the `add` command
        self.group = None               # Supervisor group name ([program:x] / [group:x])
        self.sv = None                  # Supervisor events: listener pool, *_events_enabled...
        self.group_priority = None      # a [group:x]'s priority (Circus's sense): boot, shutdown
        self.forward_output = True      # no stream: pass output on to the daemon's stdout/stderr
        self.where = None               # "file:line [section]", for errors found after loading
        self.dep_where = None           # _Where of its depends_on key (cycle errors)
        for k, v in (options or {}).items():
            self.set(k, v)

    #: Where convert_watcher_option's kinds of key are kept (streams: see set).
    _HOLDERS = {"opt": "options", "hook": "hooks", "rlimit": "rlimits", "free": "free"}

    def set(self, key, value):
        """Apply one option; raises ValueError naming the problem."""
        whole = self._WHOLE.get(key)        # a whole object: env, hooks, rlimits, a stream
        if whole is not None:
            return whole(self, key, value)
        kind, k, v = convert_watcher_option(key, value)
        if kind == "stream":
            which, k = k.split(".", 1)
            getattr(self, which)[k] = v
        else:
            getattr(self, self._HOLDERS[kind])[k] = v

    def _set_env(self, key, value):
        if isinstance(value, str):      # `env = A=1,B=2` (Circus drops it silently)
            value = convert_value("env", value)
        if not isinstance(value, dict):
            raise ValueError("env must be an object of NAME: value strings")
        self.env = {str(k): str(v) for k, v in value.items()}

    def _set_stream(self, key, value):
        if not isinstance(value, dict):
            raise ValueError("%s must be an object with a 'class' key" % key)
        for k, v in value.items():
            convert_watcher_option("%s.%s" % (key, k), v)
        setattr(self, key, {str(k): v for k, v in value.items()})

    def _set_hooks(self, key, value):
        if not isinstance(value, dict):
            raise ValueError("hooks must be an object keyed by hook name")
        for name, spec in value.items():
            self.set("hooks." + name, spec)

    def _set_rlimits(self, key, value):
        if not isinstance(value, dict):
            self.free[key] = value          # not an object: kept as a free-form key
            return
        for res, lim in value.items():
            self.set("rlimit_" + res, lim)

    _WHOLE = {"env": _set_env, "stdout_stream": _set_stream, "stderr_stream": _set_stream,
              "hooks": _set_hooks, "rlimits": _set_rlimits}

    def check(self):
        o = self.options
        if o["virtualenv"] and not os.path.isdir(o["virtualenv"]):
            raise ValueError("virtualenv %r does not exist" % o["virtualenv"])
        if o["virtualenv"] and not venv_site_packages(o["virtualenv"], o["virtualenv_py_ver"]):
            raise ValueError("virtualenv %r has no lib/python%s/site-packages (set virtualenv_py_ver "
                             "to its Python version)" % (o["virtualenv"], o["virtualenv_py_ver"]
                                                         or "%d.%d" % sys.version_info[:2]))
        if o["singleton"] and o["numprocesses"] > 1:
            raise ValueError("singleton = true allows numprocesses 0 or 1, not %d"
                             % o["numprocesses"])
        if o["numprocesses"] < 0:
            raise ValueError("numprocesses must be >= 0")
        if isinstance(o["ready"], float) and o["ready"] >= o["ready_timeout"]:
            raise ValueError("ready = %g can never happen within ready_timeout = %g: raise "
                             "ready_timeout" % (o["ready"], o["ready_timeout"]))
        if o["cron"] and o["restart_cron"]:
            err = ValueError("cron and restart_cron exclude each other: cron runs a task on schedule, "
                             "restart_cron restarts a long-running watcher")
            err.key = "restart_cron"
            raise err
        self._check_spawnable()
        for which in ("stdout_stream", "stderr_stream"):
            conf = getattr(self, which)
            if conf and "class" not in conf and "filename" not in conf:
                raise ValueError("%s.* needs %s.class (e.g. FileStream) or %s.filename"
                                 % (which, which, which))
        return self

    @property
    def starts_at_boot(self) -> bool:
        """autostart, unless a `cron` schedule starts it."""
        return self.options["autostart"] and not self.options["cron"]

    def _check_spawnable(self):
        """What every spawn would trip on (an open quote, a NUL in env): an error now, not a
        watcher that never starts."""
        import shlex
        o = self.options
        words = ("shell_args",) if o["shell"] else ("cmd", "args")
        for key in words:
            if isinstance(o[key], str):
                try:
                    shlex.split(o[key])
                except ValueError as e:
                    err = ValueError("%s: %r cannot be split into words: %s" % (key, o[key], e))
                    err.key = key
                    raise err from None
        for k, v in self.env.items():
            if not k or "=" in k or "\0" in k + v:
                raise ValueError("env: %r=%r: a name may not be empty or hold '=', and neither may "
                                 "hold a NUL byte" % (k, v))

    def key(self):
        """Everything that defines this watcher, for reloadconfig diffs."""
        return json.dumps([self.options, self.env, self.env_file, self.hooks, self.rlimits,
                           self.stdout_stream, self.stderr_stream, self.free],
                          sort_keys=True, default=str)


class CircusConfig:
    """The whole config: ``[circus]`` globals, sockets, watchers, plugins."""

    def __init__(self, path=None):
        self.path = path
        # no endpoint in the file: ipc sockets in a private folder (Circus: TCP 5555-5557)
        self.endpoint = default_endpoint("control")
        self.pubsub_endpoint = default_endpoint("pubsub")
        self.stats_endpoint = default_endpoint("stats")
        self.allow_insecure_endpoint = False
        self.curve_secret_key = None        # CurveZMQ: the daemon's key pair file (.key_secret)
        self.curve_authorized_keys = None   # and the clients' public keys (a folder of .key files)
        self.curve_owner_keys = None        # clients with endpoint_owner's rights only (the same)
        self.multicast_endpoint = None      # Circus: on by default; here only when set
        self.endpoint_owner = None
        self.statsd = False
        self.check_delay = 5.0
        self.warmup_delay = 0
        self.umask = None
        self.httpd = False
        self.httpd_host = "127.0.0.1"
        self.httpd_port = 8080
        self.httpd_token = None         # None: the dashboard makes one at start (loopback only)
        self.debug = False
        self.debug_gc = False
        self.pidfile = None
        self.loglevel = None
        self.logoutput = None
        self.log_format = "text"        # or json: one object per record (see setup_logging)
        self.log_echo = False           # [supervisord] logfile: also on stdout in the foreground
        self.sv_http = []               # [unix_http_server]/[inet_http_server]: SvHttpConf, XML-RPC
        self.loggerconfig = None
        self.fqdn_prefix = None
        self.metrics_endpoint = None    # HOST:PORT serving Prometheus /metrics
        self.max_processes = 10000      # add/incr/set may not ask for more per watcher
        self.shutdown_timeout = None    # seconds a quit may take before SIGKILL to all left
        self.minfds = None              # [supervisord] minfds: raise RLIMIT_NOFILE to it
        self.directory = None           # [supervisord] directory: chdir at start
        self.user = None                # [supervisord] user: drop privileges at start
        self.subreaper = True           # Linux: orphans of its processes come back to the daemon
        self.cgroup = True              # a cgroup v2 per watcher where the daemon can make one
        self.sockets: list = []
        self.watchers: list = []
        self.plugins: list = []
        self.warnings: list = []

    def globals_key(self):
        return json.dumps({k: v for k, v in vars(self).items()
                           if k not in ("sockets", "watchers", "plugins", "warnings", "path")},
                          sort_keys=True, default=str)


def _loglevel(value) -> str:
    text = str(value).strip().lower()
    if text not in ("critical", "error", "warning", "warn", "info", "debug"):
        raise ValueError("%r: use critical, error, warning, info or debug" % (value,))
    return text


def _logoutput(value) -> str:
    """``-``, ``stdout``, a file, or ``syslog://[HOST:PORT][/DEV]?FACILITY``."""
    text = str(value).strip()
    if text.startswith("syslog://"):
        from urllib.parse import urlparse
        import logging.handlers as handlers
        try:
            u = urlparse(text)
            u.port              # parsed on access: a bad port raises here, not at start
        except ValueError:
            raise ValueError("%r: bad syslog address (syslog://HOST:PORT?FACILITY)" % text) from None
        if (u.query or "user") not in handlers.SysLogHandler.facility_names:
            raise ValueError("%r: unknown syslog facility %r (e.g. user, daemon, local0)"
                             % (text, u.query))
    return text


def _log_format(value) -> str:
    text = str(value).strip().lower()
    if text not in ("text", "json"):
        raise ValueError("%r: use text or json" % (value,))
    return text


def _known_user(value) -> str:
    """endpoint_owner: a user this machine knows (not a traceback when the socket is bound)."""
    text = str(value).strip()
    resolve_user(text, None)
    return text


_CIRCUS_KEYS = {
    "endpoint": zmq_endpoint, "pubsub_endpoint": zmq_endpoint, "stats_endpoint": zmq_endpoint,
    "multicast_endpoint": udp_group, "endpoint_owner": _known_user, "statsd": to_bool,
    # check_delay is only reported (circusd takes -1, a corpus config has it): finite suffices
    "check_delay": ranged(to_float), "warmup_delay": _delay, "umask": _umask,
    "httpd": to_bool, "httpd_host": str, "httpd_port": _port, "httpd_token": str, "debug": to_bool,
    "debug_gc": to_bool, "pidfile": str, "loglevel": _loglevel, "logoutput": _logoutput,
    "log_format": _log_format,
    "loggerconfig": str, "fqdn_prefix": str, "include": str, "include_dir": str,
    "metrics_endpoint": host_port, "max_processes": _count, "allow_insecure_endpoint": to_bool,
    "shutdown_timeout": _seconds,
    "curve_secret_key": str, "curve_authorized_keys": str, "curve_owner_keys": str,
    "subreaper": to_bool, "cgroup": to_bool,
    # Documented by Circus but not read by it; accepted for the same files.
    "statsd_close_outputs": to_bool, "httpd_close_outputs": to_bool, "stream_backend": str,
}

_SOCKET_KEYS = ("host", "port", "family", "type", "proto", "backlog", "path", "umask",
                "replace", "so_reuseport", "blocking", "interface")


def _unknown_key(where, known, what="unknown key, ignored", hint_only=False):
    """The warning for a key nothing reads, naming the closest known key (a likely typo).
    hint_only: None unless some known key is close."""
    import difflib
    close = difflib.get_close_matches(where.key, list(known), n=1, cutoff=0.8 if hint_only else 0.75)
    if hint_only and not close:
        return None
    return "%s: %s%s" % (where, what, " (did you mean %s?)" % close[0] if close else "")


def _watcher_key_names() -> list:
    """Every key a watcher section can hold, the families by their usual members (for hints)."""
    streams = ("class", "filename", "max_bytes", "backup_count", "time_format")
    return (list(WATCHER_OPTIONS) + ["env"] + ["hooks." + h for h in HOOK_NAMES]
            + ["rlimit_" + r for r in RLIMITS] + ["flapping." + k for k in FLAPPING_OPTIONS]
            + [w + "." + k for w in ("stdout_stream", "stderr_stream") for k in streams])


def _free_key_warnings(ini, section, wc) -> list:
    """Free-form keys nothing reads: not flapping.*, not used as $(circus.KEY) in the section.
    Circus keeps them (hooks and plugins may read them); so do we, with a word."""
    text = " ".join(str(v) for v in ini.items(section).values()).lower()
    return [_unknown_key(ini.where(section, key), _watcher_key_names(),
                         "unknown key, kept as a free-form option for hooks and plugins")
            for key in wc.free
            if not (key.startswith("flapping.") and key[9:] in FLAPPING_OPTIONS)
            and "circus.%s" % key.lower() not in text]


def depends_on_matches(name: str, conf) -> bool:
    """Does the depends_on ``name`` mean the watcher of ``conf``: by its own name, or by its
    Supervisor group (every process of a program, or of a [group:x])."""
    n = name.lower()
    return conf.name.lower() == n or (conf.group or "").lower() == n


def check_dependencies(confs) -> None:
    """ConfigError for a depends_on that names nothing, or for a cycle (named, with the
    file:line of the depends_on that closes it)."""
    deps = {}
    for wc in confs:
        found = deps[wc.name.lower()] = []
        for n in wc.options["depends_on"]:
            them = [x for x in confs if depends_on_matches(n, x)]
            if not them:
                raise ConfigError("%s: no watcher, program or group named %r"
                                  % (wc.dep_where or "watcher %s depends_on" % wc.name, n))
            found += [x for x in them if x not in found]
    state, path = {}, []        # name -> 1 (on the path) or 2 (done)

    def visit(wc):
        state[wc.name.lower()] = 1
        path.append(wc)
        for d in deps[wc.name.lower()]:
            if state.get(d.name.lower()) == 1:
                cycle = " -> ".join(x.name for x in path[path.index(d):] + [d])
                w = wc.dep_where
                raise ConfigError("%s: depends_on cycle: %s" % (
                    "%s:%s" % (w.file, w.line) if w else "watcher " + wc.name, cycle))
            if d.name.lower() not in state:
                visit(d)
        state[wc.name.lower()] = 2
        path.pop()
    for wc in confs:
        if wc.name.lower() not in state:
            visit(wc)


def _check_max_processes(cfg, n, where) -> None:
    if n > cfg.max_processes:
        raise ConfigError("%s: %d processes is above max_processes (%d): lower it, or raise "
                          "max_processes in [circus]" % (where, n, cfg.max_processes))


class _Reader:
    """What the section readers share: the file, the config they fill, and errors
    that point at ``file:line [section] key``."""

    def __init__(self, ini: IniFile, cfg: CircusConfig, environ):
        self.ini, self.cfg, self.environ = ini, cfg, environ

    def conv(self, section, key, value, func):
        try:
            return func(value)
        except (ValueError, TypeError) as e:        # a check names its key: point at its line
            where = self.ini.where(section, key if key is not None else getattr(e, "key", None))
            raise ConfigError("%s: %s" % (where, e)) from None

    def warn_unknown(self, section, key, known, what="unknown key, ignored"):
        self.cfg.warnings.append(_unknown_key(self.ini.where(section, key), known, what))


# ---------------------------------------------------------------------------
# 5. Sockets
# ---------------------------------------------------------------------------

class CircusSocket:
    """A listening socket the daemon binds once and hands to its workers.

    It stays bound across watcher restarts, so clients queue in the backlog
    instead of seeing "connection refused". With ``so_reuseport`` each spawn
    gets a fresh SO_REUSEPORT socket of its own (``bind_fresh``) and this
    one is never bound, as in Circus (else it would take a share of the
    connections nobody accepts).
    """

    def __init__(self, conf: SocketConfig):
        self.conf = conf
        self.name = conf.name
        self.sock = None
        self.host, self.port, self.path = conf.host, conf.port, conf.path

    def _new(self):
        import socket
        c = self.conf
        family = getattr(socket, c.family)
        stype = getattr(socket, c.type)
        proto = c.proto
        if isinstance(proto, str) and proto:
            proto = socket.getprotobyname(proto)
        addr = c.path
        if family != socket.AF_UNIX:
            infos = socket.getaddrinfo(c.host, c.port, family, stype)
            if not infos:
                raise OSError("cannot resolve %r" % c.host)
            addr = infos[0][4]
        s = socket.socket(family, stype, proto or 0)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if c.so_reuseport and hasattr(socket, "SO_REUSEPORT"):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_UNIX:
                if os.path.exists(c.path):
                    if not c.replace:
                        raise OSError(errno.EADDRINUSE, "%s exists (set replace = true "
                                      "to remove a stale socket file)" % c.path)
                    os.unlink(c.path)
                old = os.umask(c.umask)
                try:
                    s.bind(addr)
                finally:
                    os.umask(old)
            else:
                s.bind(addr)
            if stype in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
                s.listen(c.backlog)
            s.setblocking(c.blocking)
        except BaseException:
            s.close()
            raise
        return s

    def check_address(self):
        """What binding needs, checked without binding (for ``check``, which must work while
        a daemon holds the address): the host resolves, the port fits, the folder exists."""
        import socket
        c = self.conf
        try:
            if isinstance(c.proto, str) and c.proto:
                socket.getprotobyname(c.proto)
            if c.family == "AF_UNIX":
                folder = os.path.dirname(os.path.abspath(c.path))
                if not os.path.isdir(folder):
                    raise OSError("folder %s does not exist" % folder)
            elif not 0 <= c.port <= 65535:
                raise OSError("port %d is not in 0..65535" % c.port)
            else:
                socket.getaddrinfo(c.host, c.port, getattr(socket, c.family), getattr(socket, c.type))
        except OSError as e:
            raise CircusError("socket %s (%s): %s" % (
                c.name, c.path or "%s:%s" % (c.host, c.port), e.strerror or e)) from None

    def bind_and_listen(self):
        if self.conf.so_reuseport:
            return
        self.sock = self._new()
        if self.conf.family != "AF_UNIX":
            self.host, self.port = self.sock.getsockname()[:2]

    def bind_fresh(self):
        """A new SO_REUSEPORT socket for one process (caller closes it after spawn)."""
        s = self._new()
        if self.conf.family != "AF_UNIX" and not self.port:
            self.port = s.getsockname()[1]
            self.conf.port = self.port
        return s

    def fileno(self):
        return self.sock.fileno() if self.sock else -1

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            if self.conf.path:
                try:
                    os.unlink(self.conf.path)
                except OSError:
                    pass

    def info(self) -> dict:
        d = {"fd": self.fileno(), "name": self.name, "backlog": self.conf.backlog}
        if self.conf.path:
            d["path"] = self.conf.path
        else:
            d["host"], d["port"] = self.host, self.port
        return d


# ---------------------------------------------------------------------------
# 6. Streams and logging
# ---------------------------------------------------------------------------
# A stream is a callable taking {"data": bytes, "pid": int, "name": "stdout",
# "wid": int, "watcher": str} with an optional close(). File streams pass output
# on as raw bytes, in the chunks read (up to 1 MiB), unless a time_format prefix
# asks for per-line work; the stdout streams write whole lines (LineAssembler).

class _Prefixer:
    """Adds ``<time> [<pid>] | `` at the start of every line, across chunks."""

    def __init__(self, time_format):
        self.time_format = time_format
        self._midline = set()

    def __call__(self, data: bytes, pid) -> bytes:
        stamp = ("%s [%s] | " % (time.strftime(self.time_format), pid)).encode()
        lines = data.splitlines(True)
        out = []
        for i, line in enumerate(lines):
            if not (i == 0 and pid in self._midline):
                out.append(stamp)
            out.append(line)
        if data.endswith(b"\n"):
            self._midline.discard(pid)
        else:
            self._midline.add(pid)
        return b"".join(out)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class _Console:
    """The daemon's own stdout or stderr, which the event loop must never wait for.

    A regular file is written at once. Anything with a reader at the other end (a
    pipe nobody drains, a paused terminal, a slow container log driver) is written
    by a thread of its own: at most MAX_PENDING bytes wait for it; beyond that,
    output is dropped, counted and said in one log line (watchers add an
    ``output_dropped`` event). The fd is never made non-blocking: its file
    description is shared with the terminal and with children that inherit it.
    """

    MAX_PENDING = 4 << 20
    LOW = 1 << 20           # readers held (Process._hold) resume below this

    def __init__(self, fd: int):
        import atexit
        self.fd = fd
        self.name = "stdout" if fd == 1 else "stderr" if fd == 2 else "fd %d" % fd
        self.dropped = 0                # bytes dropped, in all
        self.dropping = False
        self._pid = None                # the process the state below belongs to (a fork resets it)
        self._direct = False
        atexit.register(self.flush, 1.0)

    def _setup(self):
        import collections
        import stat
        import threading
        self._pid = os.getpid()
        try:
            self._direct = stat.S_ISREG(os.fstat(self.fd).st_mode)
        except OSError:
            self._direct = True         # closed: writes fail at once, nothing can block
        self._chunks = collections.deque()
        self._pending = 0
        self._waiters: dict = {}        # key -> callable, called once pending is below LOW
        self._cond = threading.Condition()
        if not self._direct:
            threading.Thread(target=self._run, name="console " + self.name, daemon=True).start()

    def write(self, data: bytes) -> bool:
        """Write or queue ``data``, never blocking; False if it was dropped instead."""
        if self._pid != os.getpid():
            self._setup()
        if self._direct:
            try:
                _write_all(self.fd, data)
            except OSError:
                pass
            return True
        with self._cond:
            room = self._pending <= self.MAX_PENDING - min(len(data), self.LOW)
            if room:
                self._chunks.append(data)
                self._pending += len(data)
                self._cond.notify()
            else:
                self.dropped += len(data)
        if room == self.dropping:       # said once per episode (outside the lock: it logs)
            self.dropping = not room
            if room:
                _log().warning("the daemon's %s is read again; %d bytes were dropped in all",
                               self.name, self.dropped)
            else:
                _log().warning("the daemon's %s is not being read: dropping what goes there "
                               "(%d bytes wait already)", self.name, self.MAX_PENDING)
        return room

    def _run(self):
        while True:
            with self._cond:
                while not self._chunks:
                    self._cond.wait()
                view = memoryview(b"".join(self._chunks))
                self._chunks.clear()
            while view:                 # what is written makes room at once, bit by bit
                try:
                    n = os.write(self.fd, view)
                except OSError:         # closed or broken: nobody is there to read it
                    n = len(view)
                view = view[n:]
                with self._cond:
                    self._pending -= n
                    self._cond.notify_all()
                    freed = [] if self._pending > self.LOW else list(self._waiters.values())
                    if freed:
                        self._waiters.clear()
                for callback in freed:
                    callback()

    def busy(self) -> bool:
        """Is its reader behind (more than LOW bytes wait)?"""
        return self._pid == os.getpid() and not self._direct and self._pending > self.LOW

    def when_free(self, key, callback) -> None:
        """Call ``callback`` (in the writer thread) once no more than LOW bytes wait; None
        forgets ``key``'s."""
        with self._cond:
            if callback is None:
                self._waiters.pop(key, None)
                return
            free = self._pending <= self.LOW
            if not free:
                self._waiters[key] = callback
        if free:
            callback()

    def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for what is queued to be written (at exit, before a fork)."""
        if self._pid != os.getpid() or self._direct:
            return
        with self._cond:
            self._cond.wait_for(lambda: not self._pending, timeout)


_CONSOLES: dict = {}     # fd -> _Console


def _console(fd: int) -> _Console:
    """The _Console of fd 1 or 2."""
    con = _CONSOLES.get(fd)
    if con is None:
        con = _CONSOLES[fd] = _Console(fd)
    return con


def utc_iso(t: float) -> str:
    """``t`` as ISO 8601 UTC with milliseconds: ``2024-05-01T13:05:09.042Z`` (the JSON logs' time)."""
    ms = int(t * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % ms


def use_colour(setting="auto", fd: int = 1) -> bool:
    """Colour on or off. ``true``/``false`` as set; ``auto``: never when NO_COLOR is set and
    not empty, always when FORCE_COLOR is, else only when ``fd`` is a terminal."""
    if str(setting).strip().lower() != "auto":
        try:
            return to_bool(setting)
        except ValueError:
            raise ValueError("colour %r: use true, false or auto" % (setting,)) from None
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    try:
        return os.isatty(fd)
    except OSError:
        return False


# honcho's order: cyan, yellow, green, magenta, red, blue, then their bright variants
_LABEL_CYCLE = ("36", "33", "32", "35", "31", "34", "1;36", "1;33", "1;32", "1;35", "1;31", "1;34")
_LABEL_COLOURS: dict = {}


def label_colour(name: str) -> str:
    """The SGR code of ``name``'s colour: the next of the cycle the first time it is asked."""
    code = _LABEL_COLOURS.get(name)
    if code is None:
        code = _LABEL_COLOURS[name] = _LABEL_CYCLE[len(_LABEL_COLOURS) % len(_LABEL_CYCLE)]
    return code


def prefix_line(label: str, line, width: int = 0, colour=None, time_format="%H:%M:%S",
                now=None) -> bytes:
    """``{time} {label} | {line}\\n`` (honcho's look), for each line of ``line`` (str or bytes):
    the label left-justified to ``width``, the prefix in SGR ``colour`` (e.g. label_colour(
    name)) when given. Used by PrefixStdoutStream and for the daemon's own ``system`` lines."""
    if isinstance(line, str):
        line = line.encode("utf-8", "replace")
    stamp = time.strftime(time_format, time.localtime(now))
    head = "%s %s | " % (stamp, label.ljust(width))
    if colour:
        head = "\033[%sm%s\033[0m" % (colour, head)
    head = head.encode()
    lines = line.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join(head + part.rstrip(b"\r") + b"\n" for part in lines or [b""])


class LineAssembler:
    """Whole lines out of the chunks of many processes, so that their output never mixes
    mid-line on one stdout. What follows a chunk's last newline is held per key (the
    process and stream) until its newline comes, until it passes CAP bytes (then it goes
    out in CAP-byte pieces, each ending in a newline) or until end() (the process exited:
    the rest gets a newline). No timer: the idle daemon stays idle."""

    CAP = 64 << 10

    def __init__(self):
        self._held: dict = {}          # key -> bytes of an unfinished line

    def feed(self, key, data: bytes) -> bytes:
        """The whole lines that ``data`` completes (b"" for none), each ending in a newline."""
        held = self._held.pop(key, None)
        if held:
            data = held + data
        cut = data.rfind(b"\n") + 1
        done, rest = data[:cut], data[cut:]
        if len(done) > self.CAP:        # only then can a line be over the cap
            done = self._cut(done)
        if len(rest) > self.CAP:
            n = (len(rest) - 1) // self.CAP * self.CAP
            done += self._cut(rest[:n] + b"\n")
            rest = rest[n:]
        if rest:
            self._held[key] = rest
        return done

    def _cut(self, block: bytes) -> bytes:
        lines = block.split(b"\n")[:-1]
        if max(map(len, lines)) <= self.CAP:
            return block
        cap = self.CAP
        return b"".join(line[i:i + cap] + b"\n" for line in lines
                        for i in range(0, max(len(line), 1), cap))

    def end(self, pid=None) -> list:
        """``[(key, rest + newline)]`` for the unfinished lines of ``pid`` (a key's first item),
        or of every key when None; they are forgotten."""
        keys = [k for k in self._held if pid is None or k[0] == pid]
        return [(k, self._held.pop(k) + b"\n") for k in keys]


class StdoutStream:
    """Writes output to the daemon's own stdout, whole lines only (LineAssembler), never
    blocking: past _Console's bound whole lines are dropped and counted."""

    def __init__(self, time_format=None, **_):
        self._prefix = _Prefixer(time_format) if time_format else None
        self.dropped = 0                # bytes dropped because stdout is not being read
        self._lines = LineAssembler()

    def __call__(self, data: dict) -> None:
        key = (data.get("pid"), data.get("name", "stdout"), data.get("watcher"), data.get("wid"))
        block = self._lines.feed(key, data["data"])
        if block:
            self._write(self.format(key, block))

    def end(self, pid) -> None:
        """Process ``pid`` is gone (reaped, pipes drained): out goes what it left mid-line."""
        for key, block in self._lines.end(pid):
            self._write(self.format(key, block))

    def format(self, key, block: bytes) -> bytes:
        """The bytes to write for ``block``, whole lines of output of ``key`` =
        (pid, stream, watcher, wid)."""
        return self._prefix(block, key[0]) if self._prefix else block

    @property
    def console(self):
        return _console(1)

    def _write(self, out: bytes) -> None:
        if not self.console.write(out):
            self.dropped += len(out)

    def close(self):
        self.end(None)


class FancyStdoutStream(StdoutStream):
    """Stdout with a ``<time> [<pid>] | `` prefix per line, coloured when colour is on
    (use_colour: a terminal, NO_COLOR, FORCE_COLOR)."""

    COLORS = {"red": 1, "green": 2, "yellow": 3, "blue": 4, "magenta": 5, "cyan": 6, "white": 7}

    def __init__(self, color=None, time_format="%Y-%m-%d %H:%M:%S", **_):
        import random
        super().__init__(time_format or "%Y-%m-%d %H:%M:%S")
        code = self.COLORS.get(str(color).lower()) or random.choice(list(self.COLORS.values()))
        self._start = b"\033[0;3%d;40m" % code if use_colour() else None

    def format(self, key, block: bytes) -> bytes:
        block = self._prefix(block, key[0])
        if self._start is None:
            return block
        return b"".join(self._start + line + b"\033[0m\n" for line in block.split(b"\n")[:-1])


class StderrStream(StdoutStream):
    """StdoutStream's rules, on the daemon's stderr (Supervisor's ``/dev/stderr`` log)."""

    @property
    def console(self):
        return _console(2)


class JSONStdoutStream(StdoutStream):
    """One JSON object per line on stdout, for log collectors: ``{"time", "name", "wid",
    "pid", "stream", "line"}`` (time as utc_iso; the line decoded as UTF-8, bad bytes
    replaced, without its line ending)."""

    def format(self, key, block: bytes) -> bytes:
        pid, stream, watcher, wid = key
        head = '{"time": "%s", "name": %s, "wid": %s, "pid": %s, "stream": %s, "line": ' % (
            utc_iso(time.time()), json.dumps(watcher), json.dumps(wid), json.dumps(pid),
            json.dumps(stream))
        text = block.decode("utf-8", "replace").split("\n")[:-1]
        return "".join(head + json.dumps(line[:-1] if line.endswith("\r") else line,
                                         ensure_ascii=False) + "}\n"
                       for line in text).encode("utf-8")


class PrefixStdoutStream(StdoutStream):
    """Honcho's look: ``{time} {watcher}.{wid} | {line}``, the label padded to ``width``
    and coloured per watcher when ``colour`` (true, false or auto: use_colour) is on."""

    def __init__(self, width=0, colour="auto", time_format="%H:%M:%S", **_):
        super().__init__()
        try:
            self.width = _count(width or 0)
        except ValueError as e:
            raise ValueError("width: %s" % e) from None
        self.colour = use_colour(colour)
        self.time_format = time_format or "%H:%M:%S"

    def format(self, key, block: bytes) -> bytes:
        pid, stream, watcher, wid = key
        return prefix_line("%s.%s" % (watcher, wid), block, self.width,
                           label_colour(str(watcher)) if self.colour else None, self.time_format)


def os_error_text(e: OSError) -> str:
    """``/path: what went wrong`` without Python's ``[Errno N]``."""
    text = e.strerror or str(e)
    return "%s: %s" % (e.filename, text) if e.filename else text


def _open_folder(folder: str, at=None) -> int:
    """An O_PATH fd of ``folder``, walked one name at a time from /.

    A root daemon writes logs and its pidfile in folders that others may be
    able to write; a symlink planted there could send its writes to any file.
    So, as root, a symlink on the way is followed only when root owns it (one
    made by someone else is an error), and the final name is opened by the
    caller relative to this fd, never through a symlink. A relative ``folder`` is
    walked from folder fd ``at`` if given.
    """
    if not hasattr(os, "O_PATH"):       # not Linux: the folder as named
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    if at is None or folder.startswith("/"):
        folder, fd = os.path.abspath(folder), os.open("/", flags)
    else:
        fd = os.open(".", flags, dir_fd=at)
    todo = [n for n in folder.split("/") if n][::-1]
    links, path = 0, "" if folder.startswith("/") else "."
    try:
        while todo:
            name = todo.pop()
            path = os.path.join(path or "/", name)
            nfd, target, st = _step_into(fd, name, path)
            if nfd is not None:
                os.close(fd)
                fd = nfd
                continue
            links += 1
            if links > 40:
                raise OSError(errno.ELOOP, "too many symlinks", folder)
            if st.st_uid != 0 and os.geteuid() == 0:
                raise PermissionError(errno.EPERM, "a symlink owned by uid %d, which the daemon "
                                      "(root) does not follow: name the real folder" % st.st_uid, path)
            path = "" if target.startswith("/") else os.path.dirname(path)
            if target.startswith("/"):
                os.close(fd)
                fd = os.open("/", flags)
            todo.extend(reversed([n for n in target.split("/") if n]))
        return fd
    except BaseException:
        os.close(fd)
        raise


def _step_into(fd: int, name: str, path: str):
    """One name of _open_folder's walk: ``(folder fd, None, stat)`` or, for a symlink,
    ``(None, its target, its stat)``; anything else is an error naming ``path``."""
    import stat
    try:
        nfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    except OSError as e:
        raise type(e)(e.errno, e.strerror, path) from None
    st = os.fstat(nfd)
    if stat.S_ISDIR(st.st_mode):
        return nfd, None, st
    target = os.readlink("", dir_fd=nfd) if stat.S_ISLNK(st.st_mode) else None
    os.close(nfd)
    if target is None:
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", path)
    return None, target, st


def _open_in(dir_fd: int, name: str, flags: int, path: str, mode=0o644, hops=0) -> int:
    """Open ``name`` in folder ``dir_fd`` for writing. As root, never through a symlink
    another user could have made (see _open_link). It must be a regular file with no
    other hard link, a device, or a FIFO root owns (opened non-blocking: one that nobody
    reads is an error, not a daemon stuck in open)."""
    flags |= os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
    root = os.geteuid() == 0
    try:
        fd = os.open(name, flags | (os.O_NOFOLLOW if root else 0), mode, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP and root:
            return _open_link(dir_fd, name, flags, path, mode, hops)
        if e.errno == errno.ENXIO:
            raise OSError(e.errno, "a FIFO that nobody reads", path) from None
        raise type(e)(e.errno, e.strerror, path) from None
    return _writable(fd, path)


def _writable(fd: int, path: str) -> int:
    """``fd`` back in blocking mode, or closed and an error when it is no place for output."""
    import stat
    st = os.fstat(fd)
    why = None
    if stat.S_ISREG(st.st_mode):
        if st.st_nlink > 1:
            why = "a hard link to a file with %d names, which the daemon does not write to" % st.st_nlink
    elif not (stat.S_ISCHR(st.st_mode) or (stat.S_ISFIFO(st.st_mode) and
                                           (st.st_uid == 0 or os.geteuid() != 0))):
        why = "not a regular file, a device or a FIFO root owns"
    if why:
        os.close(fd)
        raise OSError(errno.EPERM, why, path)
    os.set_blocking(fd, True)
    return fd


def _open_link(dir_fd: int, name: str, flags: int, path: str, mode, hops) -> int:
    """The file symlink ``name`` points to, for root: only a link root owns is followed
    (``/dev/stdout``, an admin's link), its target walked the same safe way; /proc's own
    links (``/proc/self/fd/1``) are left to the kernel."""
    target = _root_link(dir_fd, name, path, hops, "write")
    if os.fstat(dir_fd).st_dev == os.stat("/proc").st_dev:
        try:
            return _writable(os.open(name, flags, mode, dir_fd=dir_fd), path)
        except OSError as e:
            raise type(e)(e.errno, e.strerror, path) from None
    full = os.path.join(os.path.dirname(path), target)
    d = _open_folder(os.path.dirname(target) or ".", at=dir_fd)
    try:
        return _open_in(d, os.path.basename(target), flags, full, mode, hops + 1)
    finally:
        os.close(d)


def _root_link(dir_fd: int, name: str, path: str, hops: int, use: str) -> str:
    """The target of symlink ``name`` in ``dir_fd``, which root may follow only when root
    owns the link, 8 hops at most; else an ELOOP error naming ``path``."""
    import stat
    lfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(lfd)
        target = os.readlink("", dir_fd=lfd) if stat.S_ISLNK(st.st_mode) else None
    finally:
        os.close(lfd)
    if target is None or st.st_uid != 0 or hops >= 8:
        raise OSError(errno.ELOOP, "a symlink%s, which the daemon does not %s through: name "
                      "the real file" % (" owned by uid %d" % st.st_uid if st.st_uid else "", use), path)
    return target


#: The most an environment_file may hold (it is read into every spawn's environment).
ENV_FILE_MAX = 1024 * 1024


def read_small_file(path: str, limit: int, hops=0) -> bytes:
    """A regular file's bytes, at most ``limit``, read the way a root daemon must read a
    file others may control: folders walked by _open_folder, the file opened without
    following a symlink another user made, never a FIFO or device (no blocking open)."""
    import stat
    folder, name = os.path.split(path)
    d = _open_folder(folder or ".")
    try:
        root = os.geteuid() == 0
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if root else 0),
                         dir_fd=d)
        except OSError as e:
            if e.errno != errno.ELOOP or not root:
                raise type(e)(e.errno, e.strerror, path) from None
            target = _root_link(d, name, path, hops, "read")
            return read_small_file(os.path.join(folder, target), limit, hops + 1)
    finally:
        os.close(d)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(errno.EFBIG, "larger than %s" % human_size(limit), path)
    return data


def read_env_files(spec: str, base: str) -> dict:
    """The variables of environment_file ``spec`` (see _env_file_spec), later files winning;
    a relative path is taken from folder ``base``. ValueError ``file[:line]: why``."""
    env: dict = {}
    for item in (spec or "").split(","):
        item = item.strip()
        optional = item.startswith("-")
        path = os.path.join(base, os.path.expanduser(item.lstrip("-").strip()))
        try:
            text = read_small_file(path, ENV_FILE_MAX).decode("utf-8")
        except FileNotFoundError:
            if optional:
                continue
            raise ValueError("%s: no such file (a leading '-' makes it optional: -%s)" % (path, item)) from None
        except OSError as e:
            raise ValueError(os_error_text(e)) from None
        except UnicodeDecodeError as e:
            raise ValueError("%s: not UTF-8 text (%s)" % (path, e.reason)) from None
        env.update(parse_env_file(text, path))
    return env


def open_log(path: str) -> int:
    """An append fd on the log file ``path`` (created 0644 if missing), opened safely
    (see _open_folder and _open_in)."""
    d = _open_folder(os.path.dirname(path))
    try:
        return _open_in(d, os.path.basename(path), os.O_APPEND | os.O_CREAT, path)
    finally:
        os.close(d)


def _rename_in(dir_fd: int, src: str, dst: str) -> None:
    """rename(2) inside one folder fd (it never follows a symlink); a missing ``src`` is fine."""
    try:
        os.replace(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except FileNotFoundError:
        pass


class FileStream:
    """Appends to a file; with max_bytes and backup_count, rotates by size.

    Rotation renames ``f.N-1 -> f.N ... f -> f.1`` before a chunk that
    would reach max_bytes; without backup_count the file just grows.
    """

    def __init__(self, filename=None, max_bytes=0, backup_count=0, time_format=None, truncate=False, **_):
        if not filename:
            import tempfile
            fd, filename = tempfile.mkstemp(prefix="circus-", suffix=".log")
            os.close(fd)
        self.filename = os.path.abspath(str(filename))
        self.max_bytes = _count(max_bytes or 0)
        self.backup_count = _count(backup_count or 0)
        self.truncate = to_bool(truncate)       # full and no backups: start over (Supervisor)
        self.dropped = 0                # bytes lost to a full disk, in all
        self.dropping = False
        self._prefix = _Prefixer(time_format) if time_format else None
        self._fd = -1
        self._size = 0
        self.open()

    def open(self) -> None:
        """Open (or create) the file for appending (its folder must exist)."""
        self._fd = open_log(self.filename)
        self._size = os.fstat(self._fd).st_size

    def close(self) -> None:
        """Close the file; the next write reopens it."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _before_write(self, n: int) -> None:
        if self.max_bytes > 0 and self.backup_count > 0 and self._size + n >= self.max_bytes and self._size:
            self._rotate()

    def _rotate(self):
        """``f.N-1 -> f.N ... f -> f.1``: only the names this rotation makes are touched."""
        self.close()
        d = _open_folder(os.path.dirname(self.filename))
        try:
            base = os.path.basename(self.filename)
            for i in range(self.backup_count - 1, 0, -1):
                _rename_in(d, "%s.%d" % (base, i), "%s.%d" % (base, i + 1))
            _rename_in(d, base, base + ".1")
        finally:
            os.close(d)
        self.open()

    def __call__(self, data: dict) -> None:
        chunk = data["data"]
        if self._prefix:
            chunk = self._prefix(chunk, data.get("pid"))
        try:
            self._before_write(len(chunk))
            if self._fd < 0:
                self.open()
        except OSError as e:    # the file cannot be (re)opened: say why once, drop until it can
            if not self.dropping:
                _log().error("log file %s: %s; dropping output until it can be opened",
                             self.filename, os_error_text(e))
            self.dropping = True
            self.dropped += len(chunk)
            return
        view, written = memoryview(chunk), 0
        try:
            while written < len(chunk):
                written += os.write(self._fd, view[written:])
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise
            # disk full (or a file size limit): count what is lost, go on, resume when it fits
            if not self.dropping:
                _log().warning("%s: %s: dropping output until there is room", self.filename, e.strerror)
            self.dropping = True
            self.dropped += len(chunk) - written
        else:
            if self.dropping:
                _log().warning("%s: writing again; %d bytes were dropped", self.filename, self.dropped)
            self.dropping = False
        self._size += written
        if self.truncate and not self.backup_count and 0 < self.max_bytes <= self._size:
            os.ftruncate(self._fd, 0)       # Supervisor: full with no backups, start over
            self._size = 0


class WatchedFileStream(FileStream):
    """A file that is reopened when something (logrotate) moves or deletes it."""

    def __init__(self, filename=None, time_format=None, **kw):
        self._ino = None
        super().__init__(filename=filename, time_format=time_format)

    def open(self):
        super().open()
        st = os.fstat(self._fd)
        self._ino = (st.st_dev, st.st_ino)

    def _before_write(self, n):
        try:
            st = os.stat(self.filename)
            same = (st.st_dev, st.st_ino) == self._ino
        except FileNotFoundError:
            same = False
        if not same:
            self.close()
            self.open()


class TimedRotatingFileStream(FileStream):
    """Rotates on a clock: rotate_when S, M, H, D, MIDNIGHT or W0-W6 (any case)."""

    _UNITS = {"S": 1, "M": 60, "H": 3600, "D": 86400, "MIDNIGHT": 86400}
    _SUFFIX = {"S": "%Y-%m-%d_%H-%M-%S", "M": "%Y-%m-%d_%H-%M", "H": "%Y-%m-%d_%H",
               "D": "%Y-%m-%d", "MIDNIGHT": "%Y-%m-%d", "W": "%Y-%m-%d"}

    def __init__(self, filename=None, backup_count=0, time_format=None, rotate_when="H",
                 rotate_interval=1, utc=False, **_):
        self.when = when = _rotate_when(rotate_when).upper()
        self.interval = max(1, _rotate_interval(rotate_interval)) * self._UNITS.get(when, 86400 * 7)
        self.utc = to_bool(utc) if not isinstance(utc, bool) else utc
        super().__init__(filename=filename, backup_count=backup_count, time_format=time_format)
        self._next = self._compute_next(time.time())

    def _compute_next(self, now):
        if self.when in ("S", "M", "H", "D"):
            return now + self.interval
        t = time.gmtime(now) if self.utc else time.localtime(now)
        since_midnight = t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec
        nxt = now - since_midnight + 86400
        if self.when.startswith("W"):
            days = (int(self.when[1]) - t.tm_wday) % 7 or 7
            nxt = now - since_midnight + days * 86400
        return nxt

    def _before_write(self, n):
        now = time.time()
        if now < self._next:
            return
        start = self._next - self.interval
        t = time.gmtime(start) if self.utc else time.localtime(start)
        suffix = time.strftime(self._SUFFIX.get(self.when, self._SUFFIX["W"]), t)
        self.close()
        self._next = self._compute_next(now)
        d = _open_folder(os.path.dirname(self.filename))
        try:
            base = os.path.basename(self.filename)
            _rename_in(d, base, base + "." + suffix)
            if self.backup_count > 0:
                for old in self.backups(d)[:-self.backup_count]:
                    try:
                        os.unlink(old, dir_fd=d)
                    except OSError:
                        pass
        finally:
            os.close(d)
        self.open()

    # what _before_write names backups, for any rotate_when: app.log.2024-05-01[_13[-05[-09]]]
    _BACKUP = r"\.\d{4}-\d\d-\d\d(?:_\d\d(?:-\d\d(?:-\d\d)?)?)?\Z"

    def backups(self, dir_fd: int) -> list:
        """This file's backups, oldest first: only names rotation makes (``app.log.err``
        beside it is not one)."""
        pattern = re.compile(re.escape(os.path.basename(self.filename)) + self._BACKUP)
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            return sorted(n for n in os.listdir(fd) if pattern.match(n))
        finally:
            os.close(fd)


class QueueStream:
    """Puts every chunk dict on a ``queue.Queue`` (for library users and tests)."""

    def __init__(self, queue=None, **_):
        import queue as _queue
        self.queue = queue if queue is not None else _queue.Queue()

    def __call__(self, data: dict) -> None:
        self.queue.put(data)

    def close(self):
        pass


_STREAM_CLASSES = {c.__name__: c for c in (StdoutStream, StderrStream, FancyStdoutStream,
                                           JSONStdoutStream, PrefixStdoutStream, FileStream,
                                           WatchedFileStream, TimedRotatingFileStream, QueueStream)}


class ThreadedStream:
    """Runs a user's stream class in a thread of its own.

    The rule: a stream class that is not one of ours never runs in the event
    loop, so a slow or stuck one cannot delay a respawn or a command. Chunks
    reach it in order. The bound: at most MAX_PENDING bytes wait for it;
    beyond that chunks are dropped, counted and logged. After MAX_FAILURES
    exceptions in a row for one process, that process's output is no longer
    given to it (the daemon and the other streams go on).
    """

    MAX_PENDING = 16 << 20
    MAX_FAILURES = 5

    def __init__(self, factory, label: str):
        import queue
        import threading
        self.factory = factory          # builds the user's object, in the stream's own thread
        self.stream = None
        self.label = label
        self.dropped = 0                # bytes dropped because the stream fell behind
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._failures: dict = {}
        self._disabled: set = set()
        self._thread = threading.Thread(target=self._run, name="stream " + label, daemon=True)
        self._thread.start()

    def __call__(self, chunk: dict) -> None:
        if chunk.get("pid") in self._disabled:
            return
        n = len(chunk["data"])
        with self._lock:
            if self._pending + n > self.MAX_PENDING:
                if not self.dropped:
                    _log().warning("stream %s is too slow: dropping output (more than %d bytes "
                                   "waiting)", self.label, self.MAX_PENDING)
                self.dropped += n
                return
            self._pending += n
        self._queue.put(chunk)

    def _run(self):
        try:
            self.stream = self.factory()
        except (Exception, SystemExit) as e:
            _log().error("stream %s could not be built: %s: %s; its output is dropped",
                         self.label, type(e).__name__, e)
            self._disabled = _ALL
        while True:
            chunk = self._queue.get()
            if chunk is None:
                break
            with self._lock:
                self._pending -= len(chunk["data"])
            pid = chunk.get("pid")
            if pid in self._disabled:
                continue
            try:
                self.stream(chunk)
                self._failures.pop(pid, None)
            except (Exception, SystemExit) as e:
                count = self._failures[pid] = self._failures.get(pid, 0) + 1
                _log().error("stream %s failed on output of pid %s: %s: %s", self.label, pid,
                             type(e).__name__, e)
                if count >= self.MAX_FAILURES:
                    self._disabled.add(pid)
                    _log().error("stream %s disabled for pid %s after %d failures in a row",
                                 self.label, pid, count)
        close = getattr(self.stream, "close", None)
        if close is not None:
            try:
                close()
            except (Exception, SystemExit) as e:
                _log().error("stream %s failed to close: %s", self.label, e)

    def close(self) -> None:
        """Let it finish what is queued, then close it (without waiting here)."""
        self._queue.put(None)
        for thread in [t for t in _CLOSING_STREAMS if not t.is_alive()]:
            _CLOSING_STREAMS.discard(thread)
        _CLOSING_STREAMS.add(self._thread)


class _Everything:
    """A set that holds every pid (a stream that could not be built takes none)."""

    def __contains__(self, item):
        return True


_ALL = _Everything()
_CLOSING_STREAMS: set = set()


def join_streams(timeout: float) -> None:
    """Wait (in a worker thread, at exit) for closing user streams to drain, up to ``timeout``."""
    deadline = time.monotonic() + timeout
    for thread in list(_CLOSING_STREAMS):
        thread.join(max(0.0, deadline - time.monotonic()))
        _CLOSING_STREAMS.discard(thread)


def log_folder_error(conf: dict) -> str | None:
    """Why the log file of stream settings ``conf`` cannot be opened, or None. Its folder
    must exist (the daemon, often root, creates none) and be reachable safely (see
    _open_folder). Only for our file streams: a user's class does what it wants."""
    name = str(conf.get("class") or "FileStream")
    short = name.rsplit(".", 1)[-1]
    ours = short in ("FileStream", "WatchedFileStream", "TimedRotatingFileStream") and \
        (name == short or name.startswith("circus."))
    if not (ours and conf.get("filename")):
        return None
    filename = os.path.abspath(str(conf["filename"]))
    try:
        os.close(_open_folder(os.path.dirname(filename)))
    except FileNotFoundError:
        return "the folder of %s does not exist (create it first)" % filename
    except OSError as e:
        return "the folder of %s cannot be used: %s" % (filename, os_error_text(e))
    return None


def build_stream(conf: dict, search_dirs=()):
    """A stream object from ``stdout_stream.*`` settings (class + kwargs).

    Circus's dotted names (``circus.stream.FileStream``) and the short ones
    map to the built-in classes; any other dotted path is imported, and runs
    in a ThreadedStream.
    """
    conf = dict(conf)
    cls_name = conf.pop("class", None)
    if not cls_name:
        if "filename" not in conf:
            return None
        cls_name = "FileStream"
    short = cls_name.rsplit(".", 1)[-1]
    if short in _STREAM_CLASSES and (cls_name == short or cls_name.startswith("circus.")):
        cls = _STREAM_CLASSES[short]
    else:
        try:
            cls = import_dotted(cls_name, search_dirs)
        except ImportError as e:
            raise ValueError("stream class %r cannot be imported: %s" % (cls_name, e)) from None
        return ThreadedStream(lambda: cls(**conf), cls_name)
    return cls(**conf)


_LOG_FORMAT = "%(asctime)s %(name)s[%(process)d] [%(levelname)s] %(message)s"


def _json_log_formatter():
    """log_format = json: ``{"time", "level", "name", "message"}`` per record, one line each
    (time as utc_iso; a traceback in "exception"). A process's JSON line has "stream" instead
    of "level", so a collector tells the daemon's records apart."""
    class JSONFormatter(logging.Formatter):
        def format(self, record):
            out = {"time": utc_iso(record.created), "level": record.levelname.lower(),
                   "name": record.name, "message": record.getMessage()}
            if record.exc_info:
                out["exception"] = self.formatException(record.exc_info)
            return json.dumps(out, ensure_ascii=False)
    return JSONFormatter()


def _console_handler(fd: int):
    """A logging handler for the daemon's stdout/stderr that never blocks (see _Console)."""
    class ConsoleHandler(logging.Handler):
        def emit(self, record):
            try:
                _console(fd).write((self.format(record) + "\n").encode("utf-8", "replace"))
            except Exception:
                self.handleError(record)
    return ConsoleHandler()


def setup_logging(level="info", output="-", echo=False, fmt="text"):
    """Configure the "circus" logger (only the CLI calls this, never an import).
    ``echo``: a file or syslog log is also written to stdout (supervisord in the foreground).
    ``fmt``: text, or json (one object per record: _json_log_formatter)."""
    import logging.handlers as handlers
    logger = logging.getLogger("circus")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    lvl = getattr(logging, str(level or "info").upper(), None)
    if not isinstance(lvl, int):
        raise ConfigError("log level %r: use critical, error, warning, info or debug" % level)
    output = output or "-"
    datefmt = "%Y-%m-%d %H:%M:%S"
    if output in ("-", "stderr", "stdout"):
        handler = _console_handler(1 if output == "stdout" else 2)
    elif output.startswith("syslog://"):
        from urllib.parse import urlparse
        u = urlparse(output)
        facility = handlers.SysLogHandler.facility_names.get(u.query or "user", handlers.SysLogHandler.LOG_USER)
        addr = u.path if not u.netloc else (u.hostname, u.port or 514)
        handler = handlers.SysLogHandler(address=addr or "/dev/log", facility=facility)
        datefmt = "%b %d %H:%M:%S"
    else:
        class SafeFileHandler(handlers.WatchedFileHandler):
            def _open(self):        # as root: not through a symlink (see open_log)
                return os.fdopen(open_log(self.baseFilename), "a", encoding=self.encoding,
                                 errors=getattr(self, "errors", None))
        handler = SafeFileHandler(output)
    json_lines = _log_format(fmt) == "json"
    handler.setFormatter(_json_log_formatter() if json_lines else logging.Formatter(_LOG_FORMAT, datefmt))
    logger.addHandler(handler)
    if echo and output not in ("-", "stderr", "stdout"):
        echoed = _console_handler(1)
        echoed.setFormatter(_json_log_formatter() if json_lines else
                            logging.Formatter(_LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(echoed)
    logger.setLevel(lvl)
    logger.propagate = False
    return logger


# ---------------------------------------------------------------------------
# 7. Supervisor's format: [program:x] and friends, translated to watchers
# ---------------------------------------------------------------------------

_SV_FORMAT = re.compile(r"%(%|\((?P<name>[^)]*)\)(?P<spec>[-#0 +]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa])|)")


def sv_expand(value: str, names: dict, where) -> str:
    """Supervisor's ``%(name)s`` expansion, with its rules made strict.

    ``%%`` is a percent sign; ``%(name)X`` a lookup; any other ``%`` is an
    error (Supervisor silently formats a bare ``%s`` with its whole table).
    """
    def sub(m):
        if m.group(1) == "%":
            return "%"
        name = m.group("name")
        if name is None:
            raise ConfigError("%s: stray '%%' in %r: write %%%% for a percent sign" % (where, value))
        if name not in names:
            avail = ", ".join(sorted(k for k in names if not k.startswith("ENV_"))) + ", ENV_*"
            raise ConfigError("%s: unknown name %%(%s) in %r (available here: %s)"
                              % (where, name, value, avail))
        try:
            return ("%" + m.group("spec")) % (names[name],)
        except (TypeError, ValueError) as e:
            raise ConfigError("%s: %%(%s)%s: %s" % (where, name, m.group("spec"), e)) from None
    return _SV_FORMAT.sub(sub, value)


def _sv_env_names(environ) -> dict:
    return {"ENV_" + k: v for k, v in environ.items()}


_SV_ENV_WORD = re.compile(r"[\w/.+\-():]*")


def parse_sv_environment(text: str, where) -> dict:
    """``KEY=val,KEY2="a b"`` as Supervisor means it.

    Where Supervisor's tokenizer silently mangles a value (an unquoted space,
    ``$``, ``?``, ``@``, ``=``, a backslash in quotes, ``"x"y``), this stops
    with a line saying how to quote it instead.
    """
    out, pos, n = {}, 0, len(text)

    def fail(why):
        raise ConfigError("%s: environment %r: %s" % (where, text, why))
    while True:
        while pos < n and text[pos] in " \t\n":
            pos += 1
        if pos >= n:
            return out
        m = re.compile(r"[A-Za-z_][\w.]*").match(text, pos)
        if not m:
            fail("expected KEY=value at %r" % text[pos:pos + 20])
        key, pos = m.group(0), m.end()
        if pos >= n or text[pos] != "=":
            fail("%s has no '=value' (write KEY=value, pairs separated by commas)" % key)
        pos += 1
        if pos < n and text[pos] in "\"'":
            q = text[pos]
            end = text.find(q, pos + 1)
            if end < 0:
                fail("unclosed %s quote in %s's value" % (q, key))
            value = text[pos + 1:end]
            if "\\" in value:
                fail("a backslash in %s's quoted value is read differently by Supervisor "
                     "4.3 and 4.4; avoid it" % key)
            pos = end + 1
        else:
            value = _SV_ENV_WORD.match(text, pos).group(0)
            pos += len(value)
            if not value:
                fail("%s= has no value (write %s=\"\" for an empty one)" % (key, key))
        rest = text[pos:].lstrip(" \t\n")
        if rest and rest[0] not in ",;":
            fail("after %s=%s comes %r, which Supervisor would silently drop or mangle: quote "
                 "the value (%s=\"...\") and separate pairs with commas" % (key, value, rest[:12], key))
        out[key] = value
        pos = n - len(rest) + (1 if rest else 0)


def env_file_values(reader, section: str, spec) -> dict:
    """What a section's environment_file ``spec`` sets (relative paths: from the folder of
    the file holding the key); a problem is a ConfigError naming both files' lines."""
    if not spec:
        return {}
    w = reader.ini.where(section, "environment_file")
    base = os.path.dirname(os.path.abspath(w.file if w.file not in (None, "?") else reader.cfg.path or "."))
    return reader.conv(section, "environment_file", spec, lambda s: read_env_files(_env_file_spec(s), base))


def parse_byte_size(value) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*(KB|MB|GB)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError("%r is not a size (use digits with an optional KB, MB or GB)" % (value,))
    return int(m.group(1)) * {None: 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3}[
        (m.group(2) or "").upper() or None]


_SV_LOGLEVELS = {"critical": "critical", "error": "error", "warn": "warning", "info": "info",
                 "debug": "debug", "trace": "debug", "blather": "debug"}

_SV_PROGRAM_KEYS = {
    "command", "process_name", "numprocs", "numprocs_start", "priority", "autostart", "startsecs",
    "startretries", "autorestart", "exitcodes", "stopsignal", "stopwaitsecs", "stopasgroup",
    "killasgroup", "user", "redirect_stderr", "environment", "environment_file", "backoff_max",
    "directory", "umask", "serverurl",
    "stdout_logfile", "stdout_logfile_maxbytes", "stdout_logfile_backups", "stdout_capture_maxbytes",
    "stdout_events_enabled", "stdout_syslog", "stderr_logfile", "stderr_logfile_maxbytes",
    "stderr_logfile_backups", "stderr_capture_maxbytes", "stderr_events_enabled", "stderr_syslog",
    "critical",
    # fcgi-program
    "socket", "socket_backlog", "socket_owner", "socket_mode",
    # circus.py's own: schedules, start order and run-once tasks
    "cron", "restart_cron", "depends_on", "oneshot",
} | set(HEALTH_KEYS)
_SV_LISTENER_KEYS = {"events", "buffer_size", "result_handler"}
#: Keys read once per section (no %(process_num)); the others are per process.
_SV_PER_SECTION = {"priority", "autostart", "autorestart", "startsecs", "startretries", "stopsignal",
                   "stopwaitsecs", "stopasgroup", "killasgroup", "exitcodes", "redirect_stderr",
                   "numprocs", "numprocs_start", "user", "umask", "serverurl",
                   "stdout_capture_maxbytes", "stderr_capture_maxbytes", "stdout_events_enabled",
                   "stderr_events_enabled", "cron", "restart_cron", "critical", "depends_on", "oneshot"}
def _sv_path(value) -> str:
    return os.path.abspath(os.path.expanduser(value))


def _sv_logfile(value) -> str:
    return "syslog:///dev/log?daemon" if value.lower() == "syslog" else _sv_path(value)


def _sv_loglevel(value) -> str:
    if value.lower() not in _SV_LOGLEVELS:
        raise ValueError("loglevel %r: use critical, error, warn, info, debug, trace or blather" % value)
    return _SV_LOGLEVELS[value.lower()]


def _sv_user(value) -> str:
    resolve_user(value, None)           # raises when there is no such user
    return value


#: logfiles that name the daemon's own stdout/stderr: written as its console, not as a file
_SV_CONSOLES = {"/dev/stdout": "StdoutStream", "/dev/fd/1": "StdoutStream",
                "/proc/self/fd/1": "StdoutStream", "/dev/stderr": "StderrStream",
                "/dev/fd/2": "StderrStream", "/proc/self/fd/2": "StderrStream"}

#: [supervisord] keys: name -> (CircusConfig attribute, converter), set unless [circus]
#: already gave it; attribute None: checked only; no rule: accepted and ignored.
#: environment and childlogdir are read by _SupervisorReader itself.
_SV_SUPERVISORD_KEYS = {
    "environment": None, "logfile": ("logoutput", _sv_logfile), "pidfile": ("pidfile", _sv_path),
    "loglevel": ("loglevel", _sv_loglevel), "umask": ("umask", _umask), "minfds": ("minfds", _count),
    "directory": ("directory", os.path.expanduser), "user": ("user", _sv_user),
    "nodaemon": (None, to_bool), "logfile_maxbytes": None, "logfile_backups": None, "silent": None,
    "minprocs": None, "nocleanup": None, "childlogdir": None, "strip_ansi": None, "identifier": None,
}
#: Other sections' keys, for unknown-key warnings.
_SV_SECTION_KEYS = {"group:": ("programs", "priority"), "include": ("files",)}
_SV_SECTION_KEYS.update({"unix_http_server": ("file", "chmod", "chown", "username", "password"),
                         "inet_http_server": ("port", "username", "password"),
                         "supervisorctl": ("serverurl", "username", "password", "prompt", "history_file")})
_SV_IGNORED = {
    "ctlplugin:": "supervisorctl plugins do not apply to ctl",
}
#: Program keys that map straight onto a watcher option: key -> (default, converter, option).
_SV_PLAIN_KEYS = {
    "autostart": ("true", to_bool, "autostart"),
    "autorestart": ("unexpected", parse_autorestart, "autorestart"),
    "exitcodes": ("0", parse_exitcodes, "exitcodes"),
    "stopsignal": ("TERM", to_signum, "stop_signal"),
    "stopwaitsecs": ("10", _seconds, "graceful_timeout"),
    "redirect_stderr": ("false", to_bool, "redirect_stderr"),
    "backoff_max": (None, WATCHER_OPTIONS["backoff_max"][0], "backoff_max"),
    "cron": (None, _cron, "cron"),
    "restart_cron": (None, _cron, "restart_cron"),
    "critical": ("false", to_bool, "critical"),
    "depends_on": ("", _names, "depends_on"),
    "oneshot": ("false", to_bool, "oneshot"),
}


class _SupervisorReader(_Reader):
    """Translates Supervisor's sections into cfg: [supervisord] globals, then each
    [program:x] and [fcgi-program:x], once per group it is in, as watchers."""

    def __init__(self, ini, cfg, environ, seen: dict):
        import platform
        super().__init__(ini, cfg, environ)
        self.seen = seen                # watcher names taken (lower case -> name)
        self.host = platform.node()
        self.names = _sv_env_names(environ)     # %(ENV_X)s; [supervisord] environment adds to it
        self.sv_env = {}                # [supervisord] environment, for every program
        self.childlogdir = None

    def value(self, section, key, extra, default=None):
        """A key's value with %(name)s expanded (``here``: the folder of its file)."""
        items = self.ini.items(section)
        if key not in items:
            return default
        w = self.ini.where(section, key)
        table = dict(self.names)
        table["here"] = os.path.dirname(os.path.abspath(w.file)) if w.file not in (None, "?") \
            else os.path.dirname(self.cfg.path)
        table.update(extra)
        return sv_expand(items[key], table, w)

    def read(self) -> None:
        if "supervisord" in self.ini.sections:
            self.read_supervisord()
        self.childlogdir = self.value("supervisord", "childlogdir", {}) or __import__("tempfile").gettempdir()
        self._warn_sections()
        for name in self.ini.sections:
            if name.startswith(("unix_http_server", "inet_http_server")):
                self.cfg.sv_http.append(sv_http_conf(self, name))
        group_of, group_prio, rank = self._read_groups()
        for (gname, pname), name, fcgi in self._program_jobs(group_of, rank):
            _SvProgram(self, name, pname, gname, fcgi).read(group_prio.get(gname))
        for name in self.ini.sections:
            if name.startswith("eventlistener:"):      # a pool is its own group
                pname = self._check_name(name)
                _SvProgram(self, name, pname, pname, False).read(None)

    def serverurl(self):
        """SUPERVISOR_SERVER_URL as supervisord gives it: its unix socket, else its http port."""
        if "unix_http_server" in self.ini.sections and self.value("unix_http_server", "file", {}):
            return "unix://" + _sv_path(self.value("unix_http_server", "file", {}))
        port = self.value("inet_http_server", "port", {}) if "inet_http_server" in self.ini.sections else None
        if port:
            host, _, num = port.rpartition(":")
            return "http://%s:%s" % (host or "localhost", num)
        return None

    def read_supervisord(self):
        sd, cfg = "supervisord", self.cfg
        env_text = self.value(sd, "environment", {})
        if env_text:
            self.sv_env = parse_sv_environment(env_text, self.ini.where(sd, "environment"))
            self.names.update({"ENV_" + k: v for k, v in self.sv_env.items()})
        for key, rule in _SV_SUPERVISORD_KEYS.items():
            text = self.value(sd, key, {}) if rule else None
            if not text or (rule[0] and getattr(cfg, rule[0]) is not None):
                continue
            value = self.conv(sd, key, text, rule[1])
            if rule[0]:
                setattr(cfg, rule[0], value)
            if key == "logfile":        # echoed on stdout in the foreground unless silent
                cfg.log_echo = not self.conv(sd, "silent", self.value(sd, "silent", {}, "false"), to_bool)
        for key in self.ini.items(sd):
            if key not in _SV_SUPERVISORD_KEYS:
                self.warn_unknown(sd, key, _SV_SUPERVISORD_KEYS, "unknown [supervisord] key, ignored")

    def _warn_sections(self):
        for name in self.ini.sections:
            known = _SV_SECTION_KEYS.get("group:" if name.startswith("group:") else
                                         re.sub(r"^((?:unix|inet)_http_server).*", r"\1", name))
            for key in self.ini.items(name) if known else ():
                if key not in known:
                    self.warn_unknown(name, key, known)
            for prefix, why in _SV_IGNORED.items():
                if name.startswith(prefix):
                    self.cfg.warnings.append("%s: ignored: %s" % (self.ini.where(name), why))

    def _read_groups(self):
        """[group:x] programs = a,b -> (groups of each program, group priorities, start ranks)."""
        group_of, group_prio, rank = {}, {}, {}
        for pos, name in enumerate(self.ini.sections):
            if not name.startswith("group:"):
                continue
            gname = name[6:].strip()
            prio = self.value(name, "priority", {"group_name": gname})
            group_prio[gname] = self.conv(name, "priority", prio, _priority) if prio else 999
            for prog in (self.value(name, "programs", {"group_name": gname}) or "").split(","):
                prog = prog.strip()
                if not prog:
                    continue
                if not {"program:" + prog, "fcgi-program:" + prog} & set(self.ini.sections):
                    raise ConfigError("%s: programs: no [program:%s] section"
                                      % (self.ini.where(name, "programs"), prog))
                group_of.setdefault(prog, []).append(gname)
                rank.setdefault((gname, prog), (pos, len(rank)))
        return group_of, group_prio, rank

    def _check_name(self, name) -> str:
        pname = name.split(":", 1)[1].strip()
        if not pname or re.search(r"[\s:/]", pname):
            raise ConfigError("%s: a program name cannot be empty or contain spaces, ':' or '/'"
                              % self.ini.where(name))
        known = _SV_PROGRAM_KEYS | (_SV_LISTENER_KEYS if name.startswith("eventlistener:") else set())
        for key in self.ini.items(name):
            if key not in known:
                self.warn_unknown(name, key, known, "unknown program key, ignored")
        return pname

    def _program_jobs(self, group_of, rank):
        """((group, program), section, fcgi) for each program in each of its groups."""
        jobs, pos = [], {name: i for i, name in enumerate(self.ini.sections)}
        for name in self.ini.sections:
            fcgi = name.startswith("fcgi-program:")
            if not (name.startswith("program:") or fcgi):
                continue
            pname = self._check_name(name)
            for gname in group_of.get(pname, [pname]):
                jobs.append(((gname, pname), name, fcgi))
        # supervisord starts a group's members in the order of its programs=
        jobs.sort(key=lambda job: rank.get(job[0], (pos[job[1]], 0)))
        return jobs


def socket_somaxconn() -> int:
    import socket
    return getattr(socket, "SOMAXCONN", 128)


class _SvProgram:
    """One [program:x] (or [fcgi-program:x]) in one group: its watchers, one per process."""

    def __init__(self, reader: _SupervisorReader, section, pname, gname, fcgi):
        self.r, self.ini, self.cfg = reader, reader.ini, reader.cfg
        self.section, self.pname, self.gname, self.fcgi = section, pname, gname, fcgi
        self.listener = section.startswith("eventlistener:")
        self.base = {"program_name": pname, "group_name": gname, "host_node_name": reader.host}

    def get(self, key, default=None, names=None):
        return self.r.value(self.section, key, self.base if names is None else names, default)

    def conv(self, key, text, func):
        return self.r.conv(self.section, key, text, func)

    def where(self, key=None):
        return self.ini.where(self.section, key)

    def read(self, gprio) -> None:
        if "command" not in self.ini.items(self.section):
            raise ConfigError("%s: 'command' is required" % self.where())
        numprocs, start = self._numprocs()
        common = self._options()
        self.sv = sv_listener_settings(self) if self.listener else sv_output_settings(self)
        for num in range(start, start + numprocs):
            self.cfg.watchers.append(self._process(num, numprocs, common, gprio).check())

    def _numprocs(self):
        numprocs = self.conv("numprocs", self.get("numprocs", "1"), _count)
        _check_max_processes(self.cfg, numprocs, self.where("numprocs"))
        start = self.conv("numprocs_start", self.get("numprocs_start", "0"), _count)
        template = self.ini.items(self.section).get("process_name", "%(program_name)s")
        if numprocs > 1 and "%(process_num)" not in template:
            raise ConfigError("%s: numprocs = %d needs %%(process_num) in process_name, e.g. "
                              "process_name = %%(program_name)s_%%(process_num)02d"
                              % (self.where("process_name"), numprocs))
        return numprocs, start

    def _options(self) -> dict:
        """The watcher options every process of the program shares."""
        startsecs = self.conv("startsecs", self.get("startsecs", "1"), _count)
        startretries = self.conv("startretries", self.get("startretries", "3"), ranged(to_int, -1))
        stopasgroup = self.conv("stopasgroup", self.get("stopasgroup", "false"), to_bool)
        killasgroup = self.conv("killasgroup", self.get("killasgroup", str(stopasgroup)), to_bool)
        if stopasgroup and not killasgroup:
            raise ConfigError("%s: stopasgroup = true needs killasgroup = true (or leave it out)"
                              % self.where("killasgroup"))
        # listeners start first and stop last (supervisord's default priority -1)
        prio = self.conv("priority", self.get("priority", "-1" if self.listener else "999"), _priority)
        common = {
            # Supervisor starts the lowest priority first, Circus the highest: negate
            # startretries = -1: retry forever (max_retry = -1)
            "priority": -prio, "startsecs": startsecs, "max_retry": startretries + 1 or -1,
            "stopasgroup": stopasgroup, "killasgroup": killasgroup,
            "copy_env": True,       # Supervisor children inherit its environment
            "close_child_stdin": not self.fcgi,
        }
        for key, (default, func, option) in _SV_PLAIN_KEYS.items():
            common[option] = self.conv(key, self.get(key, default), func)
        user = self.get("user")
        if user:
            common["uid"] = self.conv("user", user, _sv_user)
        umask = self.get("umask")
        if umask:
            common["umask"] = self.conv("umask", umask, _umask)
        if self.fcgi:
            common["stdin_socket"] = self._fcgi_socket()
        return common

    def _fcgi_socket(self) -> str:
        """The [fcgi-program:x] socket, added to cfg.sockets once; returns its name."""
        sock = self.get("socket")
        if not sock:
            raise ConfigError("%s: fcgi-program needs socket = tcp://HOST:PORT or unix:///PATH"
                              % self.where())
        sockname = "fcgi-" + self.pname.lower()
        opts = {"backlog": self.conv("socket_backlog", self.get("socket_backlog", str(socket_somaxconn())),
                                     _backlog),
                "blocking": True}       # as Supervisor hands it over: a blocking socket
        if sock.startswith("unix://"):
            path = sock[7:]
            if not os.path.isabs(path):
                raise ConfigError("%s: unix socket path must be absolute" % self.where("socket"))
            mode = self.conv("socket_mode", self.get("socket_mode", "0700"), _umask)
            opts.update(path=path, umask=0o777 & ~mode, replace=True)
        elif sock.startswith("tcp://"):
            host, _, port = sock[6:].rpartition(":")
            opts.update(host=host or "0.0.0.0", port=self.conv("socket", port, _port))
        else:
            raise ConfigError("%s: socket %r: use tcp://HOST:PORT or unix:///PATH"
                              % (self.where("socket"), sock))
        if sockname not in {s.name for s in self.cfg.sockets}:
            self.cfg.sockets.append(self.conv("socket", sockname, lambda n: SocketConfig(n, **opts)))
        return sockname

    def _process(self, num, numprocs, common, gprio) -> WatcherConfig:
        gname = self.gname
        per = dict(self.base, process_num=num, numprocs=numprocs)
        env_text = self.get("environment", names=per)
        prog_env = parse_sv_environment(env_text, self.where("environment")) if env_text else {}
        # as Supervisor: the program's environment is there for command, directory, logfiles, process_name
        per.update({"ENV_" + k: v for k, v in prog_env.items()})
        procname = self.get("process_name", "%(program_name)s", per) \
            if "process_name" in self.ini.items(self.section) else self.pname
        wname = procname if gname == procname else "%s:%s" % (gname, procname)
        if wname.lower() in self.r.seen:
            raise ConfigError("%s: process %r is defined twice" % (self.where(), wname))
        self.r.seen[wname.lower()] = wname
        wc = WatcherConfig(wname, common)
        wc.set("cmd", self.get("command", names=per))
        directory = self.get("directory", names=per)
        if directory:
            wc.set("working_dir", os.path.expanduser(directory))
        env = dict(SUPERVISOR_ENABLED="1", SUPERVISOR_PROCESS_NAME=procname, SUPERVISOR_GROUP_NAME=gname)
        url = self.get("serverurl", "AUTO", per)
        url = self.r.serverurl() if url.strip().upper() == "AUTO" else url
        if url:
            env["SUPERVISOR_SERVER_URL"] = url
        env.update(self.r.sv_env)
        env.update(prog_env)
        wc.env = env
        files = self.get("environment_file", names=per)
        wc.set("environment_file", files)
        wc.env_file = env_file_values(self.r, self.section, files)
        wc.group = gname
        wc.dep_where = self.where("depends_on")
        wc.sv = self.sv or None
        if gprio is not None and gname != self.pname:
            wc.group_priority = -gprio
        for key in HEALTH_KEYS:         # per process: %(process_num)s may pick its port
            text = self.get(key, names=per)
            if text is not None:
                wc.set(key, self.conv(key, text, WATCHER_OPTIONS[key][0]))
        wc.forward_output = False       # no logfile means discarded (kept for `ctl tail` only)
        for which in ("stdout", "stderr"):
            if not (which == "stderr" and common["redirect_stderr"]):     # stderr in stdout's log
                self._logfile(wc, which, per)
        return wc

    def _logfile(self, wc, which, per) -> None:
        """stdout_logfile and friends as a FileStream (AUTO: in childlogdir), or the daemon's
        own stdout/stderr for /dev/stdout and /dev/stderr."""
        logfile = self.get(which + "_logfile", "AUTO", per)
        size = self.get(which + "_logfile_maxbytes", "50MB", per)
        backups = self.get(which + "_logfile_backups", "10", per)
        if logfile.upper() in ("NONE", "OFF", ""):
            return
        if logfile.upper() == "SYSLOG":
            self.cfg.warnings.append("%s: syslog logging is not supported; output kept for `ctl tail` only"
                                     % self.where(which + "_logfile"))
            return
        if logfile.upper() == "AUTO":
            logfile = os.path.join(self.r.childlogdir,
                                   "%s-%s---supervisor.log" % (wc.name.replace(":", "_"), which))
        else:
            logfile = os.path.abspath(os.path.expanduser(logfile))
        console = _SV_CONSOLES.get(logfile)
        if console:         # the container pattern: whole lines, never blocking (no rotation)
            wc.set(which + "_stream.class", console)
            return
        wc.set(which + "_stream.class", "FileStream")
        wc.set(which + "_stream.filename", logfile)
        why = log_folder_error(getattr(wc, which + "_stream"))
        if why:
            raise ConfigError("%s: %s" % (self.where(which + "_logfile"), why))
        wc.set(which + "_stream.max_bytes", self.conv(which + "_logfile_maxbytes", size, parse_byte_size))
        wc.set(which + "_stream.backup_count", self.conv(which + "_logfile_backups", backups, _count))
        if getattr(wc, which + "_stream")["backup_count"] == 0:
            wc.set(which + "_stream.truncate", True)     # Supervisor empties a full log with no backups


# -- [eventlistener:x]: the event types a pool may subscribe to, and its own keys --

_SV_PROCESS_STATES = ("STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL",
                      "UNKNOWN")
#: Supervisor's event types: name -> its parent type (a pool subscribed to a parent gets all).
SV_EVENT_TYPES = dict(
    [("EVENT", None), ("PROCESS_STATE", "EVENT"), ("PROCESS_COMMUNICATION", "EVENT"),
     ("PROCESS_LOG", "EVENT"), ("REMOTE_COMMUNICATION", "EVENT"), ("SUPERVISOR_STATE_CHANGE", "EVENT"),
     ("TICK", "EVENT"), ("PROCESS_GROUP", "EVENT"),
     ("SUPERVISOR_STATE_CHANGE_RUNNING", "SUPERVISOR_STATE_CHANGE"),
     ("SUPERVISOR_STATE_CHANGE_STOPPING", "SUPERVISOR_STATE_CHANGE"),
     ("PROCESS_GROUP_ADDED", "PROCESS_GROUP"), ("PROCESS_GROUP_REMOVED", "PROCESS_GROUP")]
    + [("PROCESS_STATE_" + s, "PROCESS_STATE") for s in _SV_PROCESS_STATES]
    + [("PROCESS_%s_%s" % (k, ch), "PROCESS_" + k) for k in ("LOG", "COMMUNICATION")
       for ch in ("STDOUT", "STDERR")]
    + [("TICK_%d" % n, "TICK") for n in (5, 60, 3600)])


def sv_listener_settings(prog) -> dict:
    """[eventlistener:x]'s own keys, checked as supervisord checks them."""
    where = prog.where
    names = [n.strip().upper() for n in re.split(r"[,\s]+", prog.get("events", "")) if n.strip()]
    if not names:
        raise ConfigError("%s: an event listener needs events = (e.g. PROCESS_STATE_FATAL)" % where())
    for n in names:
        if n not in SV_EVENT_TYPES:
            raise ConfigError("%s: unknown event type %s (known: %s)"
                              % (where("events"), n, ", ".join(sorted(SV_EVENT_TYPES))))
    size = prog.conv("buffer_size", prog.get("buffer_size", "10"), _count)
    if size < 1:
        raise ConfigError("%s: must be 1 or more" % where("buffer_size"))
    handler = prog.get("result_handler", "supervisor.dispatchers:default_handler")
    if handler != "supervisor.dispatchers:default_handler":
        raise ConfigError("%s: only the default result_handler (OK accepts, anything else "
                          "rejects) is supported" % where("result_handler"))
    if prog.conv("redirect_stderr", prog.get("redirect_stderr", "false"), to_bool):
        raise ConfigError("%s: true would mix stderr into the listener protocol: leave it out"
                          % where("redirect_stderr"))
    return {"pool": prog.pname, "events": sorted(set(names)), "buffer_size": size}


def sv_output_settings(prog) -> dict:
    """*_events_enabled and *_capture_maxbytes of a program, only those that are on."""
    out = {}
    for ch in ("stdout", "stderr"):
        if prog.conv(ch + "_events_enabled", prog.get(ch + "_events_enabled", "false"), to_bool):
            out[ch + "_events"] = True
        cap = prog.conv(ch + "_capture_maxbytes", prog.get(ch + "_capture_maxbytes", "0"),
                        parse_byte_size)
        if cap:
            out[ch + "_capture"] = cap
    return out


# -- [unix_http_server] / [inet_http_server]: where Supervisor's XML-RPC is served --

class SvHttpConf:
    __slots__ = ("where", "path", "host", "port", "chmod", "chown", "username", "password")

    def __init__(self, where, **kw):
        self.where, self.path, self.host, self.port = where, None, None, None
        self.chmod, self.chown, self.username, self.password = 0o700, None, None, None
        for k, v in kw.items():
            setattr(self, k, v)


def sv_http_conf(reader, section) -> SvHttpConf:
    """One [unix_http_server] / [inet_http_server] section, checked."""
    get = lambda key, default=None: reader.value(section, key, {}, default)     # noqa: E731
    where = reader.ini.where(section)
    conf = SvHttpConf(where, username=get("username"), password=get("password"))
    if bool(conf.username) != bool(conf.password):
        raise ConfigError("%s: set both username and password, or neither" % where)
    if section.startswith("unix_http_server"):
        path = get("file")
        if not path:
            raise ConfigError("%s: 'file' is required: the socket's path" % where)
        conf.path = os.path.abspath(os.path.expanduser(path))
        conf.chmod = reader.conv(section, "chmod", get("chmod", "0700"), lambda v: int(v, 8) & 0o777)
        conf.chown = get("chown")
        if conf.chown:
            reader.conv(section, "chown", conf.chown, lambda v: resolve_user(*(v.split(":", 1) + [None])[:2]))
    else:
        port = get("port")
        if not port:
            raise ConfigError("%s: 'port' is required: HOST:PORT or PORT" % where)
        host, _, num = port.rpartition(":")
        conf.host, conf.port = host or "0.0.0.0", reader.conv(section, "port", num, _port)
        if host in ("", "*"):
            conf.host = "0.0.0.0"
    return conf


# ---------------------------------------------------------------------------
# 8. Reading a config file: a Circus INI (with any Supervisor sections in it)
# ---------------------------------------------------------------------------


def _read_with_includes(path: str, environ, warnings: list) -> IniFile:
    import glob
    ini = IniFile()
    ini.read(path)
    base = os.path.dirname(os.path.abspath(path))
    main = ini.items("circus")
    patterns = main.get("include", "").split()
    for d in main.get("include_dir", "").split():
        patterns.append(os.path.join(d, "*.ini"))
    if "files" in ini.items("include"):      # Supervisor's [include] files = globs
        import platform
        names = _sv_env_names(environ)
        names.update(here=base, host_node_name=platform.node())
        patterns += sv_expand(ini.items("include")["files"], names, ini.where("include", "files")).split()
    for pat in patterns:
        full = pat if os.path.isabs(pat) else os.path.join(base, pat)
        found = sorted(glob.glob(full))
        if not found:
            warnings.append("%s: include %r matches no file" % (path, pat))
        for f in found:
            if os.path.abspath(f) != os.path.abspath(path):
                ini.read(f)
    return ini


def _check_curve_conf(cfg, ini) -> None:
    """Both CurveZMQ keys or neither; paths are relative to the config file; keys must load."""
    base = os.path.dirname(cfg.path or ".")
    for key in ("curve_secret_key", "curve_authorized_keys", "curve_owner_keys"):
        if getattr(cfg, key):
            setattr(cfg, key, os.path.join(base, os.path.expanduser(getattr(cfg, key))))
    if bool(cfg.curve_secret_key) != bool(cfg.curve_authorized_keys):
        have, need = (("curve_secret_key", "curve_authorized_keys") if cfg.curve_secret_key
                      else ("curve_authorized_keys", "curve_secret_key"))
        raise ConfigError("%s: %s needs %s too (the folder of client .key files; see "
                          "`python circus.py ctl keygen`)" % (ini.where("circus", have), have, need))
    if cfg.curve_owner_keys and not (cfg.curve_secret_key and cfg.endpoint_owner):
        raise ConfigError("%s: curve_owner_keys needs curve_secret_key and endpoint_owner (its "
                          "keys get endpoint_owner's rights)"
                          % ini.where("circus", "curve_owner_keys"))
    if cfg.curve_secret_key:
        try:
            load_curve_key(cfg.curve_secret_key, secret=True)
            authorized_keys(cfg.curve_authorized_keys)
            if cfg.curve_owner_keys:
                authorized_keys(cfg.curve_owner_keys)
        except CircusError as e:
            raise ConfigError("%s: %s" % (ini.where("circus"), e)) from None


def _check_httpd_conf(cfg, ini) -> None:
    """The dashboard stays on loopback unless a token guards it."""
    try:
        check_token(cfg.httpd_token)
    except ValueError as e:
        raise ConfigError("%s: %s" % (ini.where("circus", "httpd_token"), e)) from None
    if cfg.httpd and not cfg.httpd_token and not is_loopback(cfg.httpd_host):
        raise ConfigError("%s: the dashboard on %s would be open to other hosts: set httpd_token "
                          "(16+ characters) or use httpd_host = 127.0.0.1"
                          % (ini.where("circus", "httpd_host"), cfg.httpd_host))


class _CircusReader(_Reader):
    """Circus's sections: [env] and [env:PATTERNS], [circus], [socket:x], [watcher:x], [plugin:x]."""

    def __init__(self, ini, cfg, environ):
        super().__init__(ini, cfg, environ)
        self.seen = {}          # watcher names by their lower case; Supervisor's programs too
        # [env] and [env:PATTERNS]: $NAME and $(circus.env.X) come from the daemon's environment
        # ([env:...] also sees [env]; circusd leaves $(circus.env.X) literal there: a difference)
        self.table = {"env." + k.lower(): v for k, v in environ.items()}
        self.global_env = self._env_values("env")
        self.table.update({"env." + k.lower(): v for k, v in self.global_env.items()})
        self.env_sections = [([p.strip() for p in name[4:].split(",") if p.strip()], self._env_values(name))
                             for name in ini.sections if name.startswith("env:")]

    def _env_values(self, name):
        return {k: replace_circus_vars(expand_env_refs(v, self.environ), self.table)
                for k, v in self.ini.items(name).items()}

    def expand(self, value, table=None):
        return replace_circus_vars(value, self.table if table is None else table) \
            if isinstance(value, str) else value

    def read(self) -> CircusConfig:
        self.read_circus()
        # sockets, watchers and plugins, sorted by name as Circus does
        for kind, read in (("socket:", self.read_socket), ("watcher:", self.read_watcher),
                           ("plugin:", self.read_plugin)):
            for name in sorted(n for n in self.ini.sections if n.startswith(kind)):
                if self.ini.items(name):
                    read(name)
        if any(is_supervisor_section(n) for n in self.ini.sections):
            _SupervisorReader(self.ini, self.cfg, self.environ, self.seen).read()
        for name in self.ini.sections:
            if name != "circus" and not name.startswith(("socket:", "watcher:", "plugin:", "env")) \
                    and not is_supervisor_section(name):
                self.cfg.warnings.append("%s: unknown section, ignored" % self.ini.where(name))
        self._check_socket_refs()
        check_dependencies(self.cfg.watchers)
        return self.cfg

    def read_circus(self):
        cfg, items = self.cfg, self.ini.items("circus")
        for key, value in items.items():
            if key not in _CIRCUS_KEYS:
                self.warn_unknown("circus", key, _CIRCUS_KEYS, "unknown [circus] key, ignored")
            elif key not in ("include", "include_dir"):     # read by _read_with_includes
                setattr(cfg, key, self.conv("circus", key, self.expand(value), _CIRCUS_KEYS[key]))
        if "stats_endpoint" in items:
            cfg.statsd = True
        _check_curve_conf(cfg, self.ini)
        _check_httpd_conf(cfg, self.ini)

    def read_socket(self, name):
        items = self.ini.items(name)
        for key in [k for k in items if k not in _SOCKET_KEYS]:     # circusd ignores them too
            self.warn_unknown(name, key, _SOCKET_KEYS, "unknown socket key, ignored")
            del items[key]
        try:
            self.cfg.sockets.append(SocketConfig(name[7:], **{k: self.expand(v) for k, v in items.items()}))
        except (ValueError, TypeError) as e:
            w = self.ini.where(name, getattr(e, "key", None))
            raise ConfigError("%s:%s [%s] %s" % (w.file, w.line, name, e)) from None

    def read_watcher(self, name):
        ini, cfg = self.ini, self.cfg
        wname = self._watcher_name(name)
        wc = WatcherConfig(wname)
        wc.where = str(ini.where(name))
        wc.dep_where = ini.where(name, "depends_on")
        wenv = self._watcher_env(wname)
        wtable = dict(self.table)
        wtable.update({"env." + k.lower(): v for k, v in wenv.items()})
        for key, value in ini.items(name).items():
            self.conv(name, key, self._expand_option(key, value, wtable), lambda v, k=key: wc.set(k, v))
        wc.env = wenv           # the [env] sections win over an `env` key
        wc.env_file = env_file_values(self, name, wc.options["environment_file"])
        cfg.warnings += _free_key_warnings(ini, name, wc)
        if not wc.options["cmd"]:
            wc.options["cmd"] = ""
            cfg.warnings.append("%s: no 'cmd': this watcher cannot start until one is set"
                                % ini.where(name))
        self.conv(name, None, wc, WatcherConfig.check)
        _check_max_processes(cfg, wc.options["numprocesses"], ini.where(name, "numprocesses"))
        for which in ("stdout_stream", "stderr_stream"):
            why = log_folder_error(getattr(wc, which))
            if why:
                raise ConfigError("%s: %s" % (ini.where(name, which + ".filename"), why))
        cfg.watchers.append(wc)

    def _watcher_name(self, name):
        wname = name[8:].strip()
        if not wname:
            raise ConfigError("%s: a watcher needs a name: [watcher:NAME]" % self.ini.where(name))
        if wname.lower() in self.seen:
            raise ConfigError("%s: watcher names are case-insensitive; %r clashes with %r"
                              % (self.ini.where(name), wname, self.seen[wname.lower()]))
        self.seen[wname.lower()] = wname
        return wname

    def _watcher_env(self, wname):
        """[env] with the [env:PATTERNS] sections matching the watcher's name over it."""
        import fnmatch
        wenv = dict(self.global_env)
        for pats, values in self.env_sections:
            if pats and any(fnmatch.fnmatchcase(wname, p) for p in pats):
                wenv.update(values)
        return wenv

    def _expand_option(self, key, value, wtable):
        """$(circus.X) in a watcher's value: text and free-form keys see the watcher's own
        env, typed options the global one; hooks, rlimits and stop_signal are never expanded,
        as in Circus."""
        if key.startswith(("hooks.", "rlimit_")) or key == "stop_signal":
            return value
        typed = key in WATCHER_OPTIONS and WATCHER_OPTIONS[key][0] not in (str, _str_or_none, _args)
        return self.expand(value, self.table if typed else wtable)

    def read_plugin(self, name):
        conf = {k: self.expand(v) for k, v in self.ini.items(name).items()}
        self.cfg.warnings += plugin_key_warnings(self.ini, name, conf)
        self.cfg.plugins.append((name[7:], conf))

    def _check_socket_refs(self):
        sockets = {s.name for s in self.cfg.sockets}
        for wc in self.cfg.watchers:
            for ref in re.findall(r"circus\.sockets\.([\w.\-]+)", wc.options["cmd"] + " " +
                                  str(wc.options["args"] or ""), re.IGNORECASE):
                if ref.lower() not in sockets:
                    self.cfg.warnings.append("%s: refers to socket %r but there is no [socket:%s] "
                                             "section; the text is passed on as it is"
                                             % (self.ini.where("watcher:" + wc.name, "cmd"), ref, ref))


def load_config(path: str, environ=None) -> CircusConfig:
    """Read and validate a Circus INI file (with its includes).

    Raises ConfigError with one line naming file, section, key and the fix.
    """
    environ = dict(os.environ if environ is None else environ)
    cfg = CircusConfig(os.path.abspath(path))
    ini = _read_with_includes(path, environ, cfg.warnings)
    return _CircusReader(ini, cfg, environ).read()


#: Circus's own plugins: built in here, or why not.
CIRCUS_PLUGINS = {
    "circus.plugins.flapping.Flapping": "flapping",
    "circus.plugins.resource_watcher.ResourceWatcher": "watchdog",
    "circus.plugins.statsd.StatsdEmitter": "statsd",
}


UNSUPPORTED_PLUGINS = {
    "circus.plugins.watchdog.WatchDog": "UDP heartbeats are not supported; use max_rss / max_cpu, "
                                        "or a plugin of yours",
    "circus.plugins.statsd.FullStats": "use the stats channel (stats_endpoint) or /metrics instead",
    "circus.plugins.command_reloader.CommandReloader": "not supported; `ctl reload NAME` after a deploy",
    "circus.plugins.http_observer.HttpObserver": "not supported (it is broken in Circus 0.19 too)",
    "circus.plugins.redis_observer.RedisObserver": "not supported",
}


#: Keys Circus's own plugins read (besides use and priority, which every plugin has).
_PLUGIN_KEYS = {
    "flapping": tuple(FLAPPING_OPTIONS),
    "watchdog": ("watcher", "service", "max_mem", "max_cpu", "loop_rate", "max_count", "min_cpu",
                 "min_mem", "health_threshold", "process_children", "child_signal"),
    "statsd": ("host", "port", "sample_rate", "application_name"),
}


def plugin_key_warnings(ini, section, conf) -> list:
    """A built-in plugin: any key it does not read. Your own plugin reads what it likes:
    only near-misses of use/priority are worth a word."""
    builtin = CIRCUS_PLUGINS.get(conf.get("use"))
    if conf.get("use") in UNSUPPORTED_PLUGINS:
        return []           # the whole section gets its own warning
    known = ("use", "priority") + _PLUGIN_KEYS.get(builtin, ())
    what = "unknown key, ignored" if builtin else "unknown key, passed to the plugin as it is"
    out = [_unknown_key(ini.where(section, key), known, what, hint_only=builtin is None)
           for key in conf if key not in known]
    return [w for w in out if w]


# ---------------------------------------------------------------------------
# 9. Process
# ---------------------------------------------------------------------------

class ChildWatcher:
    """Tells us the moment a child we started exits; never polls.

    Linux 5.3+: one pidfd per child in the event loop (readable on exit).
    Elsewhere: a SIGCHLD handler that waits on *our* pids only (never
    ``waitpid(-1)``, which would steal other code's children). As PID 1 or
    a subreaper, SIGCHLD also has it reap the orphans it adopted.
    """

    def __init__(self, loop):
        self.loop = loop
        self._cbs: dict = {}
        self._sigchld = False
        self._exited: list = []         # pids whose pidfd turned readable, reaped in 5 ms turns
        self._draining = False
        self._scan = None               # an orphan scan is due (PID 1, subreaper)
        if TREES.reaping:
            self._on_sigchld_too()

    def add(self, pid: int, callback) -> None:
        """Call ``callback(pid, wait_status)`` once ``pid`` has exited (it is reaped)."""
        if HAS_PIDFD:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                fd = None
            if fd is not None:
                self._cbs[pid] = (callback, fd)
                self.loop.add_reader(fd, self._exit_seen, pid, fd)
                return
        self._cbs[pid] = (callback, None)
        self._on_sigchld_too()
        self._ready(pid)            # it may have exited before the handler existed

    def _on_sigchld_too(self):
        if not self._sigchld:
            self.loop.add_signal_handler(signal.SIGCHLD, self._on_sigchld)
            self._sigchld = True
            # a wave of deaths fills the loop's wakeup pipe: harmless (one byte wakes the
            # scan of all), so no "Exception ignored" line per signal on stderr
            fd = signal.set_wakeup_fd(-1)
            signal.set_wakeup_fd(fd, warn_on_full_buffer=False)

    def _exit_seen(self, pid, fd):
        """A pidfd turned readable. A wave of deaths is reaped in turns of 5 ms, so the
        control channel answers between them (waitpid can be slow when thousands exit)."""
        self.loop.remove_reader(fd)
        TREES.forget(pid)       # dead: no move into a cgroup once its pid can be reused
        self._exited.append(pid)
        if not self._draining:
            self._draining = True
            self.loop.call_soon(self._drain)

    def _drain(self):
        until = time.monotonic() + 0.005
        try:
            while self._exited and time.monotonic() < until:
                self._ready(self._exited.pop(0))
        finally:        # a callback that raised must not stop the reaping of the others
            if self._exited:
                self.loop.call_soon(self._drain)
            else:
                self._draining = False

    def _ready(self, pid):
        try:
            wpid, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:   # reaped elsewhere: the status is lost
            wpid, status = pid, 0
        if wpid == 0:
            fd = self._cbs.get(pid, (None, None))[1]
            if fd is not None:      # not quite gone yet: watch its pidfd again
                self.loop.add_reader(fd, self._exit_seen, pid, fd)
            return
        callback, fd = self._cbs.pop(pid, (None, None))
        if fd is not None:
            os.close(fd)
        if callback is not None:
            callback(pid, status)

    def _on_sigchld(self):
        for pid, (cb, fd) in list(self._cbs.items()):
            if fd is None:
                self._ready(pid)
        if TREES.reaping and self._scan is None:    # once per burst of signals
            self._scan = self.loop.call_soon(self.reap_orphans)

    def reap_orphans(self) -> None:
        """Reap the zombies among the daemon's children that are not ours to wait for
        (orphans adopted as PID 1 or subreaper), never a managed process (pidfd or
        SIGCHLD above) nor a child code in the daemon's own process group waits for."""
        self._scan = None
        ours = os.getpgrp()
        for pid in own_children():
            if pid not in self._cbs and _zombie_pgid(pid) not in (None, ours):
                where = TREES.cgroup_of(pid)
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                TREES.tidy(where)       # its leaf may be empty now

    def close(self):
        for pid, (cb, fd) in list(self._cbs.items()):
            if fd is not None:
                self.loop.remove_reader(fd)
                os.close(fd)
        self._cbs.clear()
        self._exited.clear()
        if self._scan is not None:
            self._scan.cancel()
            self._scan = None
        if self._sigchld:
            self.loop.remove_signal_handler(signal.SIGCHLD)
            self._sigchld = False


_CHILD_WATCHERS = weakref.WeakKeyDictionary()     # loop -> ChildWatcher, dies with its loop


def _child_watcher(loop) -> ChildWatcher:
    cw = _CHILD_WATCHERS.get(loop)
    if cw is None or cw.loop is not loop:
        cw = _CHILD_WATCHERS[loop] = ChildWatcher(loop)
    return cw


def _prctl(option: int, arg: int) -> bool:
    import ctypes
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def own_children() -> list:
    """The pids of the daemon's children (Linux: /proc, every thread's), [] elsewhere."""
    kids = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open("/proc/self/task/%s/children" % tid) as f:
                kids += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            pass
    return kids


def _zombie_pgid(pid: int):
    """The process group of ``pid`` if it is a zombie (/proc/PID/stat), else None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()   # state ppid pgrp ...
    except (OSError, IndexError):
        return None
    return int(fields[2]) if fields[0] == b"Z" else None


def _cgroup_home():
    """The daemon's own cgroup v2 folder, or the reason there is none."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = next((line.rstrip("\n")[3:] for line in f if line.startswith("0::")), None)
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f if " - cgroup2 " in line]
    except OSError as e:
        return None, "cannot read /proc: %s" % e.strerror
    if rel is None or not mounts:
        return None, "no cgroup v2 hierarchy"
    root, point = mounts[0][3], mounts[0][4]
    if root != "/" and not (rel + "/").startswith(root + "/"):
        return None, "the daemon's cgroup %s is outside the cgroup2 mount" % rel
    return os.path.join(point, rel[len(root.rstrip("/")):].lstrip("/")), None


def _orphans() -> list:
    """The daemon's children no ChildWatcher waits for."""
    managed = set()
    for cw in list(_CHILD_WATCHERS.values()):
        managed.update(cw._cbs)
    return [pid for pid in own_children() if pid not in managed]


def _remove_stale_cgroups(home) -> None:
    """What daemons killed unannounced left: only empty cgroups go (rmdir refuses others).
    A PID 1's pid says nothing here (another namespace's): its empty ones go too."""
    try:
        names = os.listdir(home)
    except OSError:
        return
    for name in names:
        m = re.match(r"circus\.py-(\d+)-[0-9a-f]+$", name)
        if m and (m.group(1) == "1" or not _psutil.pid_exists(int(m.group(1)))):
            for folder, _, _ in os.walk(os.path.join(home, name), topdown=False):
                try:
                    os.rmdir(folder)
                except OSError:
                    pass


class TreeKeeper:
    """What each process leaves behind (double-forked, setsid'ed daemons) goes with it.

    Set up by the daemon (setup()): on Linux it makes itself a child subreaper
    (or is PID 1), so orphans of its processes come back to it and ChildWatcher
    reaps them. Each watcher gets a cgroup v2 under the daemon's own, and each
    process a leaf in it: ``<own>/circus.py-<pid>-<x>/w<n>-<watcher>/p<n>``. A
    thread of its own moves each new process into its leaf (a migration waits
    for an RCU grace period, ~10 ms: never on the event loop, never in the
    respawn's path) and a stop ends the leaf with ``cgroup.kill``. Every process
    also carries its leaf's name in $CIRCUS_PY_TREE, so what escaped before the
    move (or everything, without a cgroup: not root, no cgroup2, cgroup =
    false) is found too: a stop signals its process group, its descendants and
    the adopted orphans that carry that name.
    """

    ENV = "CIRCUS_PY_TREE"

    def __init__(self):
        self.reaping = False    # orphans are ours to reap (PID 1 or subreaper)
        self.pid1 = False
        self.tag = None         # set up: names start with it; None: nothing kept
        self.root = None        # the cgroup folder of it all, in cgroup mode
        self.kill_file = False  # cgroup.kill (Linux 5.14+)
        self._seq = 0
        self.lingering = set()  # cgroup folders to remove once empty
        import threading
        self._moving: dict = {}     # pid -> leaf, for the mover thread (under _lock)
        self._lock = threading.Lock()
        self._mover = None      # the one-thread executor that moves processes into leaves

    def setup(self, subreaper=True, cgroup=True) -> str:
        """Become PID 1's or a subreaper's reaper, find or make the cgroup; says which
        mechanism whole-tree stops use."""
        linux = sys.platform.startswith("linux")
        self.pid1 = os.getpid() == 1
        if linux and subreaper and not self.pid1:
            subreaper = _prctl(36, 1)       # PR_SET_CHILD_SUBREAPER
        self.reaping = linux and (self.pid1 or bool(subreaper))
        self.tag = "circus.py-%d-%s" % (os.getpid(), os.urandom(3).hex())
        why = self._make_root() if cgroup and linux else ("cgroup = false" if linux else "not Linux")
        how = ("cgroup v2 %s (cgroup.kill%s)" % (self.root, "" if self.kill_file else ": no, SIGKILL per pid")
               if why is None else "process group%s (no cgroup: %s)"
               % (" + adopted orphans" if self.reaping else "", why))
        return "%s; whole-tree stop: %s" % ("PID 1, reaping orphans" if self.pid1 else "subreaper"
                                            if self.reaping else "not a subreaper", how)

    def _make_root(self):
        if not HAS_PIDFD:       # a pid must be known dead before it is reaped (see forget)
            return "no pidfd (Linux before 5.3)"
        home, why = _cgroup_home()
        if home is None:
            return why
        _remove_stale_cgroups(home)
        top = os.path.join(home, self.tag)
        try:
            # cgroup v2's no-internal-process rule does not bite: the daemon's own cgroup has
            # the daemon in it, so it has no controllers enabled (or is a root, exempt)
            os.mkdir(top)
            # moving a child from here into a leaf takes writing both cgroup.procs: checked now
            for where in (home, top):
                os.close(os.open(os.path.join(where, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))
        except OSError as e:
            try:
                os.rmdir(top)
            except OSError:
                pass
            return "%s: %s" % (home, e.strerror)
        self.root = top
        self.kill_file = os.path.exists(os.path.join(top, "cgroup.kill"))
        return None

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def branch(self, watcher_name: str) -> str | None:
        """A new name (and cgroup) for a watcher's processes; None when not set up."""
        if self.tag is None:
            return None
        self._seq += 1
        name = "w%d-%s" % (self._seq, re.sub(r"[^A-Za-z0-9_.-]", "_", watcher_name)[:64])
        return self._mkdir(name)

    def leaf(self, branch: str) -> str:
        """A new process's leaf name in ``branch``; the mover thread makes the cgroup."""
        self._seq += 1
        return "%s/p%d" % (branch, self._seq)

    def _mkdir(self, name):
        if self.root is not None:
            try:
                os.makedirs(self.path(name), exist_ok=True)
            except OSError as e:
                _log().error("cgroup %s: %s; without cgroups from now on", self.path(name), e.strerror)
                self.root = None
        return name

    def spawn_in(self, name: str, popen):
        """``popen()`` (returning ``(pid, ...)``), then the child moved into cgroup ``name``
        by the mover thread."""
        spawned = popen()
        if self.root is not None:
            pid = spawned[0]
            with self._lock:
                self._moving[pid] = name
            self._submit(self._move, pid)
        return spawned

    def _submit(self, fn, *args) -> None:
        """Run ``fn`` in the mover thread (cgroup writes, mkdir and rmdir: off the loop)."""
        if self._mover is None:
            import concurrent.futures
            self._mover = concurrent.futures.ThreadPoolExecutor(1, "circus-cgroup")
        self._mover.submit(fn, *args)

    def _move(self, pid: int) -> None:
        """(mover thread) Into its leaf, unless it died meanwhile: a pid forgotten (see
        forget) may be another process's by now."""
        with self._lock:
            name = self._moving.pop(pid, None)
            root = self.root
            if name is None or root is None:
                return
            try:
                os.makedirs(os.path.join(root, name), exist_ok=True)
                fd = os.open(os.path.join(root, name, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, b"%d" % pid)
                finally:
                    os.close(fd)
            except OSError:     # gone already, or its leaf is: $CIRCUS_PY_TREE still finds it
                pass

    def forget(self, pid: int) -> None:
        """``pid`` exited and is about to be reaped: never move it (the mover holds the
        lock while it writes, so a move either happened or will not)."""
        if self._moving:
            with self._lock:
                self._moving.pop(pid, None)

    def env(self, name: str) -> dict:
        """What a process's environment gets so its orphans can be told apart."""
        return {self.ENV: "%s/%s" % (self.tag, name)} if self.reaping else {}

    def kill(self, name: str, signum=signal.SIGKILL) -> None:
        """Signal everything in tree ``name`` (a watcher's branch or a process's leaf)."""
        if self.tag is None:
            return
        self._signal(self._adopted(name), signum)      # what left before a move, or without cgroups
        if self.root is None:
            return
        path = self.path(name)
        if signum == signal.SIGKILL and self.kill_file:
            try:
                with open(os.path.join(path, "cgroup.kill"), "w") as f:
                    f.write("1")
            except OSError:     # gone already
                pass
            return
        for _ in range(3 if signum == signal.SIGKILL else 1):   # SIGKILL: what forked meanwhile too
            pids = self._members(path)
            for pid in pids:
                try:
                    os.kill(pid, signum)
                except OSError:
                    pass
            if not pids:
                break

    @staticmethod
    def _members(path) -> list:
        pids = []
        for folder, _, _ in os.walk(path):
            try:
                with open(os.path.join(folder, "cgroup.procs")) as f:
                    pids += [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                pass
        return pids

    def _adopted(self, name) -> list:
        """The daemon's children it did not start (adopted orphans) carrying tree ``name``,
        and their descendants (psutil objects)."""
        want, found = "%s=%s/%s" % (self.ENV, self.tag, name), []
        for pid in _orphans():
            try:
                with open("/proc/%d/environ" % pid, "rb") as f:
                    env = f.read().decode("utf-8", "replace").split("\0")
                if any(v == want or v.startswith(want + "/") for v in env):
                    p = _psutil.Process(pid)
                    found += [p] + p.children(recursive=True)
            except (OSError, _psutil.Error):
                pass
        return found

    @staticmethod
    def _signal(procs, signum):
        for p in procs:
            try:
                p.send_signal(signum)
            except (_psutil.Error, OSError):
                pass

    def remove(self, name: str) -> None:
        """A watcher or process gone: its tree killed, its cgroup removed (once empty)."""
        if self.tag is None or name is None:
            return
        self.kill(name)
        if self.root is not None:
            self.lingering.add(self.path(name))
            self.tidy()

    def release(self, name: str) -> None:
        """A process reaped: its leaf goes once what it left has gone too (in the mover
        thread, after its move)."""
        if self.root is not None and name:
            self._submit(self._linger, self.path(name))

    def _linger(self, path) -> None:
        with self._lock:
            self.lingering.add(path)
        self.tidy(path)

    def cgroup_of(self, pid: int):
        """The cgroup folder of a process (a zombie's too), if it is one of ours."""
        if self.root is None:
            return None
        try:
            with open("/proc/%d/cgroup" % pid) as f:
                rel = next((line.rstrip("\n")[3:] for line in f if line.startswith("0::")), "")
        except OSError:
            return None
        mine = "/%s/" % self.tag
        return self.root + rel[rel.index(mine) + len(mine) - 1:] if mine in rel + "/" else None

    def tidy(self, path=None) -> None:
        """Remove the cgroups that are empty now (deepest first), or only ``path``."""
        with self._lock:        # the loop's thread and the mover's
            todo = sorted(self.lingering, key=len, reverse=True) if path is None else \
                [path] if path in self.lingering else []
            for path in todo:
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    pass
                except OSError:         # EBUSY: a process or a cgroup still in it
                    continue
                self.lingering.discard(path)

    async def close(self, timeout=2.0) -> None:
        """At quit: nothing may remain under the daemon. Everything left is killed, the
        daemon waits (bounded) until its reaper has reaped it, then removes its cgroups."""
        if self.tag is None:
            return
        if self._mover is not None:     # what it has yet to do (moves, removals) first
            self._mover.shutdown(wait=True)
            self._mover = None
        if self.root is not None:
            self.kill("")
            for folder, _, _ in os.walk(self.root):
                self.lingering.add(folder)
        self._signal(_psutil.Process().children(recursive=True), signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.reaping and _orphans() or self._busy()):
            await asyncio.sleep(0.01)       # the SIGCHLD reaper does the reaping
        self.tidy()

    def _busy(self) -> bool:
        self.tidy()
        return bool(self.lingering)


TREES = TreeKeeper()


class NotifyListener:
    """The sd_notify socket processes report ``READY=1`` on (watcher option ``ready = notify``).

    One abstract-namespace datagram socket per loop (reachable whatever uid
    a process runs as); the kernel stamps each message with the sender's pid
    (SO_PASSCRED), so a process can only vouch for itself or its children.
    """

    def __init__(self, loop):
        import socket
        self._socket = socket
        self.loop = loop
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        name = "circus.py-notify-%d-%s" % (os.getpid(), os.urandom(6).hex())
        self.sock.bind("\0" + name)
        self.sock.setblocking(False)
        self.address = "@" + name           # NOTIFY_SOCKET's spelling of an abstract socket
        self.waiting: dict = {}             # pid -> callback()
        loop.add_reader(self.sock.fileno(), self._read)

    def _read(self):
        import struct
        sk = self._socket
        for _ in range(64):         # then the loop's other work: a flood can't starve it
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, sk.CMSG_SPACE(12))
            except OSError:         # drained (BlockingIOError) or closed
                return
            if not self.waiting:
                continue
            pids = [struct.unpack("3i", c[:12])[0] for lvl, typ, c in anc
                    if lvl == sk.SOL_SOCKET and typ == sk.SCM_CREDENTIALS and len(c) >= 12]
            if pids and b"READY=1" in data.split(b"\n"):
                callback = self._owner(pids[0])
                if callback is not None:
                    callback()

    def close(self):
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _owner(self, pid):
        """The callback of ``pid`` or of its nearest waiting ancestor (a shell's child)."""
        for _ in range(4):
            if pid in self.waiting:
                return self.waiting.pop(pid)
            try:
                pid = _psutil.Process(pid).ppid()
            except _psutil.Error:
                return None
            if pid <= 1:
                return None
        return None


_NOTIFY_LISTENERS = weakref.WeakKeyDictionary()     # loop -> NotifyListener


def _notify_listener(loop) -> NotifyListener:
    nl = _NOTIFY_LISTENERS.get(loop)
    if nl is None:
        nl = _NOTIFY_LISTENERS[loop] = NotifyListener(loop)
    return nl


def _addr_key(addr):
    """The port of an inet address (psutil's or getsockname()'s), else the unix path."""
    return ("port", addr[1]) if isinstance(addr, tuple) else addr


def _listening(pid: int, inherited: set) -> bool:
    """Does the process (or a child) listen on a socket of its own (not one of ours)?"""
    try:
        proc = _psutil.Process(pid)
        for p in [proc] + proc.children(recursive=True):
            for c in p.net_connections(kind="all") if hasattr(p, "net_connections") else p.connections("all"):
                if c.status == _psutil.CONN_LISTEN and c.laddr and _addr_key(c.laddr) not in inherited:
                    return True
    except _psutil.Error:
        pass
    return False


_NOFILE: list = []     # [soft RLIMIT_NOFILE], read once (None: unlimited)


_START_NOFILE: list = []    # [(soft, hard)] children get: the daemon's at start, lifted to minfds


_CHILD_NOFILE: list = []    # the same, once ensure_fds lifted the daemon's own above it


_NOFILE_TOP: list = []      # [the highest soft limit the daemon can have], once reached


def child_nofile():
    """The open files limit (soft, hard) a child must be given back, or None: the
    daemon's raised limit is for its own fds; children get the one it started with
    (lifted to [supervisord] minfds, as supervisord's children get)."""
    return _CHILD_NOFILE[0] if _CHILD_NOFILE else None


def fd_limit():
    """The soft limit of open files (None when unlimited), as ensure_fds left it."""
    if not _NOFILE:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        _NOFILE.append(None if soft == resource.RLIM_INFINITY else soft)
    return _NOFILE[0]


def _raise_nofile(minfds=None):
    """At start (daemon mode): remember the open files limit children get, and apply
    [supervisord] minfds to it, as supervisord does. The daemon lifts its own limit
    only when its processes need it (ensure_fds): until then children inherit theirs
    and spawn with nothing exec'd in front."""
    import resource
    inf = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if minfds and hard != inf and minfds > hard:
        if os.geteuid() != 0:
            raise CircusError("[supervisord] minfds = %d is above the hard limit of open files (%d): "
                              "raise it (ulimit -Hn, LimitNOFILE=) or lower minfds" % (minfds, hard))
        hard = minfds
    if minfds and soft != inf and minfds > soft:
        soft = minfds
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        except (ValueError, OSError) as e:
            raise CircusError("[supervisord] minfds = %d: cannot raise the limit of open files: %s"
                              % (minfds, e)) from None
    _START_NOFILE[:] = [(soft, hard)]
    _CHILD_NOFILE.clear()
    _NOFILE_TOP.clear()
    _NOFILE.clear()


def ensure_fds(needed: int) -> None:
    """Lift the daemon's soft limit of open files (as root, the hard one up to the
    kernel's nr_open) so that ``needed`` fit twice over. Only a daemon that had to
    gives its children their start limit back (prlimit in front of the command)."""
    soft = fd_limit()
    if not _START_NOFILE or soft is None or needed <= soft or soft in _NOFILE_TOP:
        return
    import resource
    inf = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * needed
    if hard != inf and want > hard and os.geteuid() == 0:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                hard = max(hard, min(int(f.read()), 1 << 20))
        except (OSError, ValueError):
            pass
    want = want if hard == inf else min(want, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), hard))
    except (ValueError, OSError):
        return
    _NOFILE.clear()
    now = resource.getrlimit(resource.RLIMIT_NOFILE)
    if now[0] == hard:
        _NOFILE_TOP[:] = [hard]     # as high as it goes: not asked again at every spawn
    _CHILD_NOFILE[:] = [_START_NOFILE[0]] if now != _START_NOFILE[0] else []


def fds_needed(processes: int) -> int:
    """The fds the daemon wants for ``processes``: a pidfd and two pipes each, and room
    for its own (log files, sockets, control and HTTP clients)."""
    return 3 * processes + 256


def _rlimit_setter(rlimits: dict, nofile=None):
    """A preexec function setting resource limits (only used when asked for); ``nofile``:
    the (soft, hard) open files limit to give back first (see child_nofile)."""
    import resource
    pairs = [(resource.RLIMIT_NOFILE, nofile)] if nofile else []
    for name, value in rlimits.items():
        res = getattr(resource, "RLIMIT_" + name.upper(), None)
        if res is None:
            continue
        if value is None:
            value = resource.RLIM_INFINITY
        pairs.append((res, (value, value)))

    def set_limits():
        for res, value in pairs:
            try:
                resource.setrlimit(res, value)
            except (ValueError, OSError):
                if res == resource.RLIMIT_NOFILE:   # "unlimited" means the hard limit
                    hard = resource.getrlimit(res)[1]
                    resource.setrlimit(res, (hard, hard))
    return set_limits


_TOOLS: dict = {}


def _exec_tool(name: str, *probe) -> str | None:
    """The path of util-linux's ``name`` if ``name *probe -- true`` works here (asked once).
    Such a tool in front of the command costs the daemon far less than a Python
    preexec_fn, which makes subprocess fork instead of vfork."""
    if name not in _TOOLS:
        import shutil
        path = shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
        if path:
            try:
                ok = subprocess.run([path] + list(probe) + ["--", "true"], timeout=10,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL).returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
            path = path if ok else None
        _TOOLS[name] = path
    return _TOOLS[name]


def _setpriv() -> str | None:
    """setpriv, if it can set a parent-death signal."""
    return _exec_tool("setpriv", "--pdeathsig", "TERM")


def _prlimit() -> str | None:
    """prlimit, if it can set the open files limit of what it runs."""
    return _exec_tool("prlimit", "--nofile=%s:" % _rlim_text(fd_limit()))


def _rlim_text(value) -> str:
    return "unlimited" if value is None or value < 0 else str(value)


def _setpriv_signal(signum: int) -> str:
    """setpriv's spelling: TERM, RTMIN+3 (it takes no numbers)."""
    try:
        return signal.Signals(signum).name[3:]
    except ValueError:          # a real-time signal has no name of its own
        return "RTMIN+%d" % (signum - signal.SIGRTMIN)


def _check_executable(name: str, cwd, env) -> None:
    """Raise what exec would (ENOENT, EACCES) for a command behind the setpriv wrapper."""
    if "/" in name:
        candidates = [os.path.join(cwd or os.getcwd(), name)]
    else:
        candidates = [os.path.join(d or ".", name) for d in os.get_exec_path(env)]
    denied = False
    for path in candidates:
        if os.path.isfile(path):
            if os.access(path, os.X_OK):
                return
            denied = True
    if denied:
        raise PermissionError(errno.EACCES, "Permission denied", name)
    raise FileNotFoundError(errno.ENOENT, "No such file or directory", name)


def _death_signal_setter(signum: int, then=None):
    """A preexec function: die with ``signum`` when the daemon dies (PR_SET_PDEATHSIG)."""
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def setter():
        prctl(1, signum, 0, 0, 0)       # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:      # the daemon died before that took hold
            os.kill(os.getpid(), signum)
        if then is not None:
            then()
    return setter


def _widen_pipe(fd: int) -> None:
    """Grow a pipe to 1 MiB (Linux F_SETPIPE_SZ). Only for pipes seen full: the kernel
    counts a user's pipe capacity, so widening every pipe would shrink new ones."""
    if sys.platform.startswith("linux"):
        import fcntl
        try:
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        except OSError:         # over the per-user limit: keep 64 KiB
            pass


_S = ProcState
#: Where a process may go from where, and the event (if any) that announces the move.
#: A Process lives once (a respawn is a new one): no way back from BACKOFF, EXITED, STOPPED.
PROCESS_TRANSITIONS = {
    (_S.STOPPED, _S.STARTING): None, (_S.STOPPED, _S.RUNNING): None,    # spawned
    (_S.STARTING, _S.RUNNING): "state",         # startsecs passed, or it got ready
    (_S.STARTING, _S.STOPPING): "state", (_S.RUNNING, _S.STOPPING): "state",
    (_S.STARTING, _S.BACKOFF): None,            # died before it was up: a failed start
    (_S.RUNNING, _S.EXITED): None, (_S.STOPPING, _S.STOPPED): None,
}


def _transition(table: dict, who, old: str, new: str):
    """The event of the move ``old`` -> ``new`` in ``table`` (None: none). A move the table
    lacks is a bug of ours, never a user's mistake: RuntimeError."""
    try:
        return table[old, new]
    except KeyError:
        raise RuntimeError("%r: no transition from %s to %s" % (who, old, new)) from None


class Process:
    """One child process: spawn, watch its output and exit, signal, stop.

    Usable on its own inside an asyncio loop::

        p = Process(1, "echo", ["hello"], on_output=lambda d: print(d["data"]))
        p.spawn()
        code = await p.wait()          # 0, or minus the signal number

    ``cmd`` is shlex-split (unless ``shell``) and ``args`` (a string or a list)
    appended. Stdout/stderr are piped only when ``on_output`` is given (or
    set to a file object / DEVNULL via ``stdout``/``stderr``). Spawn errors
    (missing file, permission) raise OSError from :meth:`spawn`.
    """

    # slots: a daemon holds thousands of these (a dict per instance costs ~1.3 KB more)
    __slots__ = ("wid", "cmd", "args", "working_dir", "shell", "shell_args", "uid", "gid", "env",
                 "rlimits", "executable", "pass_fds", "stdout", "stderr", "close_child_stdin",
                 "stdin", "umask", "death_signal", "on_output", "on_exit", "on_state", "loop",
                 "watcher_name", "pid", "started", "returncode", "_state", "since", "stopping", "promote", "ready",
                 "unready", "signalled", "_pipes", "_big", "_sinks", "_exited", "stdin_pipe", "branch",
                 "tree")

    def __init__(self, wid: int, cmd: str, args=None, *, working_dir=None, shell=False,
                 shell_args=None, uid=None, gid=None, env=None, rlimits=None,
                 executable=None, pass_fds=(), stdout=None, stderr=None,
                 close_child_stdin=True, stdin=None, on_output=None, on_exit=None, loop=None,
                 watcher_name="", umask=None, death_signal=0, on_state=None, tree=None):
        self.wid = wid
        self.cmd = cmd
        self.args = args
        self.working_dir = working_dir
        self.shell = shell
        self.shell_args = shell_args
        self.uid, self.gid = uid, gid
        self.env = env
        self.rlimits = rlimits or {}
        self.executable = executable
        self.pass_fds = tuple(pass_fds)
        self.stdout, self.stderr = stdout, stderr
        self.close_child_stdin = close_child_stdin
        self.stdin = stdin              # an fd for the child's stdin (stdin_socket)
        self.umask = umask
        self.death_signal = death_signal    # sent to it if the daemon dies (Linux), 0: none
        self.on_output = on_output      # callable({"data", "pid", "name", "wid", "watcher"}), like a stream
        self.on_exit = on_exit          # callable(process)
        self.on_state = on_state        # callable(process, event) for the moves the table announces
        self.loop = loop
        self.watcher_name = watcher_name
        self.pid = None                 # set by spawn()
        self.started = 0.0              # epoch time of spawn
        self.returncode = None          # Circus-style exit code once reaped
        self._state = ProcState.STOPPED     # changed by enter() only
        self.since = None               # when it entered that state
        self.stopping = False           # True once we asked it to stop
        self.signalled = False          # the `signal` command hit it: its exit is no failed start
        self.promote = None             # timer moving STARTING -> RUNNING (startsecs)
        self.ready = None               # future: True once ready (watcher option `ready`)
        self.unready = None             # gives up waiting for it (set with ready)
        self._pipes: dict = {}          # read end fd -> "stdout" / "stderr"
        self._big = ()                  # pipes already widened
        self._sinks = None              # {fd: the _Console its output went to} (see _hold)
        self._exited = None             # future resolved on exit
        self.stdin_pipe = None          # our end of its stdin when stdin=subprocess.PIPE
        self.branch = tree              # its watcher's tree (TreeKeeper), if kept
        self.tree = None                # its own leaf in it, once spawned

    def __repr__(self):
        return "<Process wid=%s pid=%s state=%s rc=%s>" % (self.wid, self.pid, self._state, self.returncode)

    @property
    def state(self) -> str:
        """Its ProcState; only enter() changes it."""
        return self._state

    def enter(self, state: str, publish=True) -> None:
        """The one way its state changes: checked against PROCESS_TRANSITIONS, timestamped,
        and passed to ``on_state`` when the table names an event (unless not ``publish``)."""
        old = self._state
        if state == old:
            return
        event = _transition(PROCESS_TRANSITIONS, self, old, state)
        self._state, self.since = state, time.time()
        if event and publish and self.on_state is not None:
            self.on_state(self, event)

    def argv(self) -> list | str:
        """The command line as spawned: a list, or one string for the shell."""
        import shlex
        args = self.args
        if self.shell:
            extra = args if isinstance(args, str) else " ".join(shlex.quote(a) for a in (args or []))
            return (self.cmd + (" " + extra if extra else ""))
        argv = shlex.split(self.cmd)
        if not argv:
            raise ValueError("no command to run: cmd is empty")
        if isinstance(args, str):
            argv += shlex.split(args)
        elif args:
            argv += [str(a) for a in args]
        return argv

    def spawn(self, starting=False) -> int:
        """Start the process (STARTING if ``starting``, else RUNNING); returns its pid.
        Raises OSError/ValueError on failure."""
        loop = self.loop or asyncio.get_event_loop()
        self.loop = loop
        argv, kw = self._popen_args()
        argv = self._wrap(argv, kw)
        if self.branch:
            self.pid, pipes = self._popen_in_tree(argv, kw)
        else:
            self.pid, pipes = self._popen(argv, kw)
        self.started = time.time()
        self.enter(ProcState.STARTING if starting else ProcState.RUNNING)
        self._exited = loop.create_future()
        self.stdin_pipe = pipes.pop("stdin", (None,))[0]
        for name, (fd, _) in pipes.items():
            os.set_blocking(fd, False)
            self._pipes[fd] = name
            loop.add_reader(fd, self._read, fd)
        _child_watcher(loop).add(self.pid, self._reaped)
        return self.pid

    def _popen_args(self):
        """argv and Popen's keywords, before any tool in front of the command."""
        argv = self.argv()
        kw = dict(cwd=self.working_dir or None, env=self.env, close_fds=True, bufsize=0,
                  pass_fds=self.pass_fds, start_new_session=True,
                  executable=self.executable or None)
        if self.shell:
            kw["shell"] = True
            if self.shell_args:
                import shlex
                argv = ["/bin/sh", "-c", argv] + shlex.split(self.shell_args)
                kw["shell"] = False
        if self.stdin is not None:
            kw["stdin"] = self.stdin
        else:
            kw["stdin"] = subprocess.DEVNULL if self.close_child_stdin else None
        piped = self.on_output is not None
        kw["stdout"] = subprocess.PIPE if (piped and self.stdout is None) else self.stdout
        kw["stderr"] = subprocess.PIPE if (piped and self.stderr is None) else self.stderr
        if self.uid is not None or self.gid is not None:
            kw.update(self._user_kw())
        if self.umask is not None:
            kw["umask"] = self.umask
        return argv, kw

    def _user_kw(self) -> dict:
        uid, gid, groups = resolve_user(self.uid, self.gid)
        kw = {}
        if uid is not None and uid != os.geteuid():
            kw["user"] = uid
            if groups is not None:
                kw["extra_groups"] = groups
        if gid is not None and gid != os.getegid():
            kw["group"] = gid
        return kw

    def _wrap(self, argv, kw):
        """Tools exec'd in front of the command (argv[0] must be the program for that) set
        what the child needs without a preexec_fn on the common path; else one goes in ``kw``."""
        wrap = not (self.executable or self.rlimits)
        chain = []
        nofile = None if "nofile" in self.rlimits else child_nofile()
        if nofile and wrap and _prlimit():
            chain = [_prlimit(), "--nofile=%s:%s" % tuple(_rlim_text(v) for v in nofile), "--"]
            nofile = None
        if self.rlimits or nofile:
            kw["preexec_fn"] = _rlimit_setter(self.rlimits, nofile)
        if self.death_signal and sys.platform.startswith("linux"):
            wrapper = _setpriv() if wrap and "preexec_fn" not in kw else None
            if wrapper:
                chain = [wrapper, "--pdeathsig", _setpriv_signal(self.death_signal), "--"] + chain
            else:
                kw["preexec_fn"] = _death_signal_setter(self.death_signal, kw.get("preexec_fn"))
        if chain:
            if kw.pop("shell", False):
                argv = ["/bin/sh", "-c", argv]
            _check_executable(argv[0], self.working_dir, self.env)    # fail here, as Popen would
            argv = chain + argv
        return argv

    def _popen_in_tree(self, argv, kw):
        """_popen in a leaf of its watcher's tree: its cgroup, else a name in its environment."""
        self.tree = TREES.leaf(self.branch)
        extra = TREES.env(self.tree)
        if extra:
            kw["env"] = dict(os.environ if kw["env"] is None else kw["env"], **extra)
        try:
            return TREES.spawn_in(self.tree, lambda: self._popen(argv, kw))
        except BaseException:
            TREES.release(self.tree)
            raise

    @staticmethod
    def _popen(argv, kw):
        """Popen; returns (pid, {name: (read fd, write fd)}). Our own pipes, as raw fds:
        Popen's file objects would cost memory per process (8 KiB buffers, 16 MiB at
        1000 processes) for reads we do with os.read anyway."""
        pipes, popen = {}, None
        try:
            for name in ("stdin", "stdout", "stderr"):
                if kw[name] == subprocess.PIPE:     # (ours, the child's): stdin's reversed
                    pipes[name] = os.pipe()[::-1] if name == "stdin" else os.pipe()
                    kw[name] = pipes[name][1]
            popen = subprocess.Popen(argv, **kw)
        finally:
            for name, (r, w) in pipes.items():
                os.close(w)
                if popen is None:
                    os.close(r)
        # The Popen object is dropped (memory per process). Marked done first, or its
        # __del__ would list it for subprocess's own waitpid() and steal our exit status.
        popen.returncode = 0
        return popen.pid, pipes

    def _read(self, fd):
        name = self._pipes.get(fd)
        if name is None:
            return
        sink = self._sinks.get(fd) if self._sinks else None
        if sink is not None and sink.busy():
            self._hold(fd, sink)
            return
        try:
            data = os.read(fd, 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(fd)
            del self._pipes[fd]
            os.close(fd)
            return
        if len(data) == 65536 and fd not in self._big:
            _widen_pipe(fd)     # a full default pipe: a heavy writer, fewer wake-ups for it
            self._big += (fd,)
        sink = self._output(data, name)
        if isinstance(sink, _Console):
            if self._sinks is None:
                self._sinks = {}
            self._sinks[fd] = sink

    def _output(self, data: bytes, name: str):
        """Give ``data`` to on_output; what it returns (the _Console it went to, if any)."""
        try:
            return self.on_output({"data": data, "pid": self.pid, "name": name, "wid": self.wid,
                                   "watcher": self.watcher_name})
        except Exception:       # a broken stream never breaks the process
            _log().exception("output handler of %s failed", self)

    HOLD = 1.0

    def _hold(self, fd: int, sink) -> None:
        """Its output goes to a stdout whose reader is behind: stop reading ``fd`` (the process
        waits on its own write, as on a full pipe) until that reader catches up, so that a
        burst is not dropped. After HOLD s one chunk is read anyway: a stalled reader holds
        nobody, and _Console drops and counts past its bound. Only while held is a timer set."""
        self.loop.remove_reader(fd)
        key, done = (id(self), fd), []

        def resume(late):
            sink.when_free(key, None)
            if done or self._pipes.get(fd) is None:
                return
            done.append(timer.cancel())
            if late:
                self._sinks[fd] = None
            self.loop.add_reader(fd, self._read, fd)

        def freed():                # in the console's thread
            try:
                self.loop.call_soon_threadsafe(resume, False)
            except RuntimeError:    # the loop is closed: the daemon is gone
                pass
        timer = self.loop.call_later(self.HOLD, resume, True)
        sink.when_free(key, freed)

    def drain(self) -> None:
        """Read what is left in the pipes, then close them (called once it is reaped, so
        no line of its own is lost). A grandchild that still holds a write end does not
        keep our read end open: its later output is not this process's (it gets EPIPE)."""
        for fd, name in list(self._pipes.items()):
            for _ in range(4):      # what was written before the exit; a writer that goes on is cut off
                try:
                    data = os.read(fd, 1 << 20)
                except OSError:     # BlockingIOError: all read, the write end is held elsewhere
                    break
                if not data:
                    break
                self._output(data, name)
            del self._pipes[fd]
            self.loop.remove_reader(fd)
            os.close(fd)

    def _reaped(self, pid, status):
        self.returncode = exit_code_of(status)
        # Supervisor's rule: a death while still STARTING (startsecs, ready) is a failed start
        self.enter(ProcState.STOPPED if self.stopping else
                   ProcState.BACKOFF if self._state == ProcState.STARTING else ProcState.EXITED)
        self.drain()
        TREES.release(self.tree)            # its cgroup, once what it left has gone too
        if self.stdin_pipe is not None:     # nobody took our end of its stdin
            os.close(self.stdin_pipe)
            self.stdin_pipe = None
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(self.returncode)
        if self.on_exit is not None:
            self.on_exit(self)

    @property
    def alive(self) -> bool:
        """True from spawn() until the process is reaped."""
        return self.pid is not None and self.returncode is None

    async def wait(self, timeout=None) -> int | None:
        """Wait for the exit; returns the exit code (or None on timeout)."""
        if self._exited is None:
            return self.returncode
        try:
            return await asyncio.wait_for(asyncio.shield(self._exited), timeout)
        except asyncio.TimeoutError:
            return None

    def send_signal(self, sig: int) -> bool:
        """Signal the process itself (a race with its exit is harmless). False, and a log
        line, when the kernel refuses (EPERM, EINVAL): a caller's stop must go on."""
        if self.alive:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:   # exited; the reap is on its way
                pass
            except OSError as e:
                _log().error("cannot send %s to pid %d: %s", signame(sig), self.pid, e.strerror)
                return False
        return True

    def children(self, recursive=False) -> list:
        """Its child processes (psutil objects), or all descendants."""
        try:
            return _psutil.Process(self.pid).children(recursive=recursive)
        except _psutil.Error:
            return []

    def signal_children(self, sig: int, recursive=False) -> None:
        """Signal its children (or all descendants with ``recursive``)."""
        for child in self.children(recursive):
            try:
                child.send_signal(sig)
            except (_psutil.Error, OSError):
                pass

    def signal_group(self, sig: int) -> bool:
        """Signal the whole process group (the leader was started in its own session);
        False, and a log line, when the kernel refuses the signal itself (EINVAL)."""
        if self.pid is None:
            return True
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        except OSError as e:
            _log().error("cannot send %s to process group %d: %s", signame(sig), self.pid, e.strerror)
            return False
        return True

    async def stop(self, sig=signal.SIGTERM, timeout=30.0, stop_children=False, on_kill=None,
                   group=False) -> int | None:
        """Send ``sig``, wait up to ``timeout`` s, then SIGKILL it and its descendants.

        ``group`` (Supervisor's stopasgroup) signals the whole process group.
        Whatever is left of its group afterwards gets ``sig`` too, so a
        ``sh -c`` wrapper's child does not outlive the stop (Circus #16).
        """
        if not self.alive:
            return self.returncode
        self.stopping = True
        self.enter(ProcState.STOPPING, publish=False)   # a watcher's stop announces it itself
        sent = self.signal_group(sig) if group else self.send_signal(sig)
        if stop_children:
            self.signal_children(sig)
        if on_kill:
            on_kill(self)
        # a signal the kernel refused is not worth waiting for: SIGKILL at once
        code = await self.wait(timeout) if sent and timeout and timeout > 0 else None
        if code is None and self.alive:
            descendants = self.children(recursive=True)
            self.signal_group(signal.SIGKILL)
            killed = self.send_signal(signal.SIGKILL)
            for child in descendants:
                try:
                    child.kill()
                except _psutil.Error:
                    pass
            if on_kill:
                on_kill(self)
            code = await self.wait() if killed else None    # not ours to kill (EPERM): give up
        if self.tree:
            self.kill_tree(signal.SIGKILL)      # what it left behind, setsid'ed daemons too
        else:
            self.signal_group(sig)
        return code

    def kill_tree(self, signum=signal.SIGKILL) -> None:
        """Signal the process and everything it left: its cgroup where it has one; else its
        process group, its descendants and the orphans the daemon adopted from it."""
        family = self.children(recursive=True) if self.alive else []
        self.send_signal(signum)
        self.signal_group(signum)
        TREES._signal(family, signum)
        if self.tree:
            TREES.kill(self.tree, signum)

    def info(self) -> dict:
        """pid, wid, state, start time and age, as a dict."""
        return {"pid": self.pid, "wid": self.wid, "state": self.state,
                "started": self.started, "age": time.time() - self.started if self.started else 0}


# ---------------------------------------------------------------------------
# 10. Watcher
# ---------------------------------------------------------------------------

class RingBuffer:
    """The last ``size`` bytes of an output stream (for `ctl tail`)."""

    def __init__(self, size=64 * 1024):
        self.size = size
        self._chunks = __import__("collections").deque()
        self._total = 0

    def append(self, data: bytes) -> None:
        """Keep ``data``, forgetting the oldest bytes beyond ``size``."""
        if len(data) >= self.size:
            self._chunks.clear()
            data = bytes(data[-self.size:])
            self._total = 0
        self._chunks.append(data)
        self._total += len(data)
        while self._total - len(self._chunks[0]) >= self.size:
            self._total -= len(self._chunks.popleft())

    def tail(self, n: int | None = None) -> bytes:
        """The last ``n`` bytes kept (all of them without ``n``)."""
        data = b"".join(self._chunks)
        return data if n is None else data[-n:] if n > 0 else b""


#: A process that dies sooner than this after its spawn counts as a failed
#: start for max_retry (Circus counts only exec errors, so a crash loop ran
#: forever; #1157).
MIN_UPTIME = 1.0
#: Hooks whose exceptions never abort anything (Circus's rule).
_IGNORED_HOOK_FAILURES = {"before_stop", "after_stop", "before_signal", "after_signal",
                          "extended_stats", "before_reap", "after_reap"}


#: Signals that mean the program crashed by itself. A quick death by any other
#: signal (someone's SIGKILL or SIGTERM) is not a failed start: it cannot spin.
_CRASH_SIGNALS = {getattr(signal, n) for n in ("SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE",
                                                "SIGSYS", "SIGTRAP") if hasattr(signal, n)}


def _is_crash(code: int) -> bool:
    return code >= 0 or -code in _CRASH_SIGNALS


#: errnos of a spawn that failed for want of fds, processes or memory
_RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM)


def _doubling(first: float, n: int, cap=5.0) -> float:
    """``first`` doubled n times, at most ``cap`` s (n is capped: no float overflow)."""
    return min(first * 2 ** min(n, 40), cap)


def _backoff(failures: int, cap=5.0) -> float:
    """Delay before retry n: 0 for the first, then 0.1 s doubling up to ``cap``."""
    return 0.0 if failures <= 1 else _doubling(0.1, failures - 2, cap)


#: Retrying forever (max_retry / startretries = -1) without backoff_max: the longest delay
#: (Supervisor's 1, 2, 3 s... would grow without end), and the most failed starts counted.
_FOREVER_CAP = 60.0
_FOREVER_COUNT = 1000


class Flapping:
    """Stops a watcher whose processes die too often, and retries later.

    Circus's flapping plugin, built in: ``attempts`` deaths within ``window``
    seconds stop the watcher (a ``flapping`` event; status BACKOFF) and it is
    started again after ``retry_in`` seconds; after ``max_retry`` such tries
    (-1: never) it stays stopped (FATAL). A stop or start by a user always
    wins: a retry never undoes it (Circus #965, #809).
    """

    KEYS = FLAPPING_OPTIONS

    def __init__(self, attempts=2, window=1.0, retry_in=7.0, max_retry=5):
        import collections
        self.attempts, self.window = max(1, attempts), window
        self.retry_in, self.max_retry = retry_in, max_retry
        self.deaths = collections.deque(maxlen=self.attempts)
        self.tries = 0

    @classmethod
    def from_settings(cls, plugin: dict | None, free: dict):
        """Settings from a [plugin:...] Flapping section and the watcher's flapping.* keys."""
        conf = {}
        for source in (plugin or {}), {k[9:]: v for k, v in free.items() if k.startswith("flapping.")}:
            for key, value in source.items():
                if key in cls.KEYS:
                    try:
                        conf[key] = cls.KEYS[key](value)
                    except ValueError as e:
                        raise ValueError("flapping.%s: %s" % (key, e)) from None
        if plugin is None and not conf or not conf.pop("active", True):
            return None
        return cls(**conf)

    def record(self, now: float) -> bool:
        """A process died; True when that makes the watcher flap."""
        self.deaths.append(now)
        if len(self.deaths) == self.attempts and now - self.deaths[0] <= self.window:
            self.deaths.clear()
            self.tries += 1
            return True
        return False

    def reset(self):
        self.deaths.clear()
        self.tries = 0


class Clock:
    """The time, timers and randomness (backoff jitter) of a restart policy: the wall
    clock, the event loop's timers, ``random.random``. Unit tests pass a fake one that
    they move forward by hand."""

    time = staticmethod(time.time)
    random = staticmethod(__import__("random").random)

    @staticmethod
    def call_later(delay: float, callback):
        """Run ``callback()`` in ``delay`` seconds; returns a handle with cancel()."""
        loop = asyncio.get_event_loop()
        return loop.call_later(delay, callback) if delay > 0 else loop.call_soon(callback)


CLOCK = Clock()


def local_minute(epoch: float, tz=None):
    """The local wall-clock time of ``epoch`` as a naive datetime (``tz``: a tzinfo such
    as zoneinfo's; None: the system's zone, $TZ)."""
    import datetime as dt
    return dt.datetime.fromtimestamp(epoch, tz).replace(tzinfo=None)


def wall_epoch(when, tz=None, not_before=None) -> float:
    """When local wall-clock time ``when`` (naive) comes. A time the clocks skip (spring
    forward) comes at the first minute after the gap; one they pass twice (fall back) at
    its first pass, or its second if the first is before ``not_before``."""
    import datetime as dt
    first = when.replace(tzinfo=tz, fold=0).timestamp()
    t = when
    for _ in range(3 * 24 * 60):       # a gap: the first minute that exists (gaps are < a day)
        at = t.replace(tzinfo=tz, fold=0).timestamp()
        if local_minute(at, tz) == t:
            break
        t += dt.timedelta(minutes=1)
    if t != when:
        return at
    if not_before is not None and first < not_before:
        return max(first, when.replace(tzinfo=tz, fold=1).timestamp())
    return first


#: The longest a schedule's timer sleeps before it reads the wall clock again: a clock
#: set forward, or a machine that slept, is noticed within this.
SCHEDULE_RECHECK = 3600.0


class Schedule:
    """Calls ``action()`` at each local minute a cron spec matches (``cron`` and
    ``restart_cron``).

    The next run is a local wall-clock minute; one event-loop (monotonic) timer waits for
    it, and on waking the wall clock is read again: still early (the clock went back)
    waits again; a minute already run never runs again (the last one is remembered);
    late (the clock jumped forward, the machine slept) runs once, then goes on from
    now, without making up the runs in between. See wall_epoch for DST.
    """

    def __init__(self, spec: str, action, kind="cron", clock=None, tz=None):
        self.spec = CronSpec(spec)
        self.kind = kind                # "cron" or "restart_cron", for status
        self.action = action
        self.clock = clock or CLOCK
        self.tz = tz
        self.last = None                # the local minute last run (naive datetime)
        self.due = None                 # (local minute, epoch) of the next run
        self._timer = None

    def start(self) -> None:
        if self._timer is None:
            self._arm()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.due = None

    def next_run(self) -> str | None:
        """The next run as an ISO 8601 local time with its UTC offset, or None."""
        import datetime as dt
        if self.due is None:
            return None
        return dt.datetime.fromtimestamp(self.due[1], self.tz).astimezone(self.tz).isoformat(timespec="seconds")

    def _arm(self) -> None:
        now = self.clock.time()
        after = local_minute(now, self.tz)
        if self.last is not None and self.last > after:     # the clock went back
            after = self.last
        minute = self.spec.next_after(after)
        if minute is None:
            self.due = None
            return
        self.due = (minute, wall_epoch(minute, self.tz, now))
        delay = min(max(self.due[1] - now, 0.001), SCHEDULE_RECHECK)
        self._timer = self.clock.call_later(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        minute, at = self.due
        if self.clock.time() >= at and (self.last is None or minute > self.last):
            self.last = minute
            try:
                self.action()
            except Exception:
                _log().exception("scheduled %s failed", self.kind)
        self._arm()


class RestartPolicy:
    """What a watcher does when a spawn fails or one of its processes exits.

    Circus's rules (this class): respawn at once; a crash within MIN_UPTIME of
    the spawn is a failed start, retried after a growing delay (_backoff) until
    max_retry; flapping stops the watcher and starts it again later. Supervisor's
    rules are SupervisorPolicy. A policy holds the counters and timers of its
    rules and acts through its watcher: top_up(), stop(), start(), _enter().
    """

    def __init__(self, watcher, clock=None):
        self.w = watcher
        self.clock = clock or CLOCK
        self.failures = 0           # consecutive failed starts (max_retry)
        self.starved = 0            # consecutive spawns the system had no room for
        self._respawn = None        # timer of a pending top-up (a backoff)
        self._flap_timer = None     # timer of flapping's retry
        self._user_gen = 0          # bumped by every start/stop not made by flapping
        self.stop_pending = False   # _stop_soon queued a stop: spawn no more meanwhile
        self.last_code = None       # returncode of the last process that exited by itself

    @staticmethod
    def of(watcher, clock=None, before=None):
        """The policy for ``watcher``'s options: Supervisor's when it has startsecs."""
        cls = SupervisorPolicy if watcher.conf.options["startsecs"] is not None else RestartPolicy
        if before is not None:
            # the rules changed (`set startsecs`): the same object under the new class, so the
            # counters go on and a pending timer or queued stop, bound to it, still clears its flag
            before.__class__ = cls
            return before
        return cls(watcher, clock)

    # -- what the watcher tells it -------------------------------------------
    @property
    def pending(self) -> bool:
        """A backoff is running: its timer will top the watcher up."""
        return self._respawn is not None

    def cancel(self) -> None:
        """The watcher stops: no top-up after that."""
        if self._respawn is not None:
            self._respawn.cancel()
            self._respawn = None

    def user_action(self, by_flapping: bool) -> None:
        """A start or stop: a user's one (not flapping's) drops whatever was queued."""
        if not by_flapping:
            self._user_gen += 1
            self.stop_pending = False       # a user's start/stop replaces a queued stop
            if self._flap_timer is not None:
                self._flap_timer.cancel()
                self._flap_timer = None
            if self.w.flapping is not None:
                self.w.flapping.reset()

    def process_up(self) -> None:
        """A process got RUNNING (startsecs, ready): failed starts stop counting."""
        self.failures = 0
        self.w._enter(shown=ProcState.RUNNING)

    def spawned(self) -> None:
        """A spawn worked after a want of resources: the BACKOFF rows and their reason go."""
        self.starved, self.w.last_error = 0, None
        self.w._enter(shown=ProcState.RUNNING)

    def spawn_failed(self, error: Exception) -> None:
        """A spawn raised ``error`` (last_error says it): retry later, or give up."""
        if isinstance(error, OSError) and error.errno in _RESOURCE_ERRNOS:
            self._short_of_resources()
        else:
            self._failed_start()

    def exited(self, p: Process, now: float) -> None:
        """A counted process exited by itself while the watcher runs."""
        w = self.w
        w._enter(shown=p.state)
        self.last_code = p.returncode       # what a critical watcher's give-up exits with
        if w.conf.options["oneshot"]:
            self._oneshot_exited(p)     # a task's end: no restart, no flapping
            return
        w.restarts += 1
        # an exit the user caused with `signal` is neither a failed start nor flapping
        if not p.signalled and w.flapping is not None and w.flapping.record(now):
            self._flap()
        else:
            self._after_exit(p, now)

    def give_up(self, why: str) -> None:
        _log().error("watcher %s: stopped (FATAL): %s. Fix it, then `ctl start %s`.",
                     self.w.name, why, self.w.name)
        if self.w.running:
            self._stop_soon(ProcState.FATAL)
        self._critical("gave up (FATAL)")

    def _critical(self, what: str) -> bool:
        """A critical watcher that will not run on ends the daemon, with the exit
        status of its last process (1 when none ran); True if it was critical."""
        w, code = self.w, self.last_code
        if not w.conf.options["critical"] or w.arbiter is None:
            return False
        w.arbiter.critical_exit(w.name, 1 if code is None else exit_status(code), "is critical and " + what)
        return True

    # -- the rules ---------------------------------------------------------------
    def _oneshot_exited(self, p: Process) -> None:
        """A oneshot's process ended: exit 0 is done (DONE once all are), anything else
        a failed start, retried per max_retry, then FATAL."""
        w = self.w
        if p.returncode == 0:
            w.finished += 1
            self.failures = 0
            if not w.processes and w.finished >= w.numprocesses:
                self._stop_soon(ProcState.DONE)
            return
        w.last_error = "oneshot pid %d %s" % (p.pid, describe_exit(p.returncode))
        self._failed_start()

    def _after_exit(self, p: Process, now: float) -> None:
        """Circus: respawn, unless respawn is off or it died at once (a failed start)."""
        w = self.w
        if not w.conf.options["respawn"]:
            if self._critical("pid %d exited (%s) and respawn = false" % (p.pid, describe_exit(p.returncode))):
                return
            if not w.processes:
                self._stop_soon(ProcState.EXITED)
        elif p.signalled:
            self._respawn_in(0)
        elif now - p.started < MIN_UPTIME and _is_crash(p.returncode):
            w.last_error = "pid %d exited %.2f s after spawning (%s)" % (
                p.pid, now - p.started, describe_exit(p.returncode))
            self._failed_start()
        else:
            self.failures = 0
            self._respawn_in(0)

    def _retry_delay(self) -> float:
        """Circus watchers retry soon: 0, then 0.1 s doubling up to 5 s (up to backoff_max
        when set)."""
        return _backoff(self.failures, self.w.conf.options["backoff_max"] or 5.0)

    def _failed_start(self) -> None:
        if self.stop_pending:
            return          # already given up: the stop is on its way
        limit = self.w.conf.options["max_retry"]
        # retrying forever (-1): the count stops growing where the delay no longer does
        self.failures = self.failures + 1 if limit >= 0 else min(self.failures + 1, _FOREVER_COUNT)
        self.w._enter(shown=ProcState.BACKOFF)
        if limit >= 0 and self.failures >= max(limit, 1):
            # speak the file's own key: a Supervisor program counts retries after the first start
            key = "startretries = %d" % (limit - 1) if self.w.conf.group is not None else \
                "max_retry = %d" % limit
            self.give_up("%d failed starts in a row (%s); last: %s" % (self.failures, key, self.w.last_error))
            return
        self._respawn_in(self._capped(self._retry_delay()))

    def _capped(self, delay: float) -> float:
        """backoff_max, when set, caps the delay, and a random 0-20 % is taken off it (so
        watchers failing together spread out, and the cap is never passed); without it a
        Supervisor program retrying forever stops growing at _FOREVER_CAP."""
        cap = self.w.conf.options["backoff_max"]
        if cap is None:
            forever = self.w.conf.options["max_retry"] < 0
            return min(delay, _FOREVER_CAP) if forever else delay
        return min(delay, cap) * (1.0 - 0.2 * self.clock.random())

    def _short_of_resources(self) -> None:
        """EMFILE, EAGAIN from fork...: the host's trouble, not the program's. Keep what
        runs, retry with a growing delay (at most 5 s), never count it against max_retry."""
        self.starved += 1
        delay = _doubling(0.25, self.starved - 1)
        self.w.last_error += "; out of system resources, retrying in %g s" % delay
        self.w._enter(shown=ProcState.BACKOFF)
        self._respawn_in(delay)

    def _respawn_in(self, delay: float) -> None:
        if self._respawn is None:
            self._respawn = self.clock.call_later(delay, self._respawn_now)

    def _respawn_now(self) -> None:
        self._respawn = None
        self.w.top_up()

    def _flap(self) -> None:
        w, f = self.w, self.w.flapping
        if self._critical("is flapping (%d deaths within %g s)" % (f.attempts, f.window)):
            return
        if f.max_retry != -1 and f.tries > f.max_retry:
            w.last_error = "flapping: stopped for good after %d tries" % (f.tries - 1)
            _log().error("watcher %s: %s; `ctl start %s` to try again", w.name, w.last_error, w.name)
            w.emit("flapping", tries=f.tries - 1, retry_in=None)
            self._stop_soon(ProcState.FATAL, by_flapping=True)
            return
        w.last_error = "flapping: %d deaths within %g s; retry in %g s (try %d of %s)" % (
            f.attempts, f.window, f.retry_in, f.tries, "unlimited" if f.max_retry == -1 else f.max_retry)
        _log().warning("watcher %s: %s", w.name, w.last_error)
        w.emit("flapping", tries=f.tries, retry_in=f.retry_in)
        self._stop_soon(ProcState.BACKOFF, by_flapping=True, then=self._arm_flap_retry)

    def _arm_flap_retry(self, gen) -> None:
        self._flap_timer = self.clock.call_later(self.w.flapping.retry_in, lambda: self._flap_retry(gen))

    def _flap_retry(self, gen) -> None:
        self._flap_timer = None
        self.w.queue(lambda: self._start_if(gen))

    async def _start_if(self, gen) -> None:
        if gen == self._user_gen and self.w.state == ProcState.STOPPED:    # checked under the lock
            await self.w.start(by_flapping=True)

    def _stop_soon(self, final_state, by_flapping=False, then=None) -> None:
        """Stop from inside (give up, flapping, exited): queued behind the commands on
        the watcher, and dropped if a user started or stopped it meanwhile; then
        ``then(generation)``, unless a user acted during the stop."""
        gen = self._user_gen
        self.stop_pending = True
        self.w.queue(lambda: self._stop_if(gen, final_state, by_flapping, then))

    async def _stop_if(self, gen, final_state, by_flapping, then) -> None:
        if gen != self._user_gen:
            return
        self.stop_pending = False
        await self.w.stop(final_state, by_flapping=by_flapping)
        if then is not None and gen == self._user_gen:
            then(gen)


class SupervisorPolicy(RestartPolicy):
    """Supervisor's rules (a watcher with startsecs): an exit inside startsecs is a
    failed start (BACKOFF, retried after 1, 2, 3 s..., FATAL after startretries);
    a later exit restarts as autorestart says."""

    def _after_exit(self, p: Process, now: float) -> None:
        o = self.w.conf.options
        if p.state == ProcState.BACKOFF and not p.signalled:     # died while STARTING
            self.w.last_error = "Exited too quickly (process log may have details)"
            self._failed_start()
            return
        expected = p.returncode in o["exitcodes"]       # a signal (< 0) is never expected
        mode = o["autorestart"] or ("true" if o["respawn"] else "false")
        if mode == "true" or (mode == "unexpected" and not expected):
            self.failures = 0
            # Supervisor restarts from EXITED on its next 1 s tick; a program that
            # dies at once is restarted about once a second, never in a busy loop
            self._respawn_in(max(0.0, MIN_UPTIME - (now - p.started)))
        elif self._critical("pid %d exited (%s) and autorestart = %s" % (p.pid, describe_exit(p.returncode), mode)):
            return
        elif not self.w.processes:
            self._stop_soon(ProcState.EXITED)

    def _retry_delay(self) -> float:
        return float(self.failures)


class WatcherOutput:
    """A watcher's output: its streams, the ring buffers `tail` reads, and the bytes
    a stream (or the daemon's own console) had to drop."""

    def __init__(self, watcher):
        self.w = watcher
        self.streams = {"stdout": None, "stderr": None}
        self.tails = {"stdout": RingBuffer(), "stderr": RingBuffer()}   # for `ctl tail`
        self._dropped: dict = {}        # stream -> bytes its stream lost (disk full), last seen
        self._forwarded = LineAssembler()   # output forwarded without a stream: whole lines too

    def check(self, conf) -> None:
        """ValueError unless the stream ``conf`` can be built."""
        if conf:
            name = conf.get("class", "FileStream")
            short = name.rsplit(".", 1)[-1]
            if not (short in _STREAM_CLASSES and (name == short or name.startswith("circus."))):
                try:
                    import_dotted(name, self.w.search_dirs)
                except ImportError as e:
                    raise ValueError("stream class %r cannot be imported: %s" % (name, e)) from None
            elif issubclass(_STREAM_CLASSES[short], StdoutStream):     # no side effects: options checked now
                try:
                    _STREAM_CLASSES[short](**{k: v for k, v in conf.items() if k != "class"})
                except (TypeError, ValueError) as e:
                    raise ValueError("%s %s" % (short, e)) from None
            why = log_folder_error(conf)
            if why:
                raise ValueError(why)

    def open(self) -> None:
        for which in ("stdout", "stderr"):
            conf = getattr(self.w.conf, which + "_stream")
            if self.streams[which] is None and conf:
                self.streams[which] = build_stream(conf, self.w.search_dirs)

    def rebuild(self, which: str) -> bool:
        """A new ``which`` stream from the conf (`set`); True if there was none (the
        processes must be respawned to get a pipe)."""
        old = self.streams[which]
        self.streams[which] = build_stream(getattr(self.w.conf, which + "_stream"), self.w.search_dirs)
        if old is not None and hasattr(old, "close"):
            old.close()
        return old is None

    def close(self, final=False) -> None:
        """Close the streams; a user's ThreadedStream lives on across restarts until ``final``
        (so an old one still draining never writes beside a new one)."""
        for which, stream in self.streams.items():
            if isinstance(stream, ThreadedStream) and not final:
                continue
            self.streams[which] = None
            if stream is not None and hasattr(stream, "close"):
                try:
                    stream.close()
                except Exception:
                    _log().exception("closing %s_stream of %s", which, self.w.name)

    def write(self, chunk: dict):
        """A chunk a process wrote: to the ring buffer, its stream, `tail -f` followers.
        Returns the daemon's console it went to, if any (the process may be held: _hold)."""
        name, w = chunk["name"], self.w
        self.tails[name].append(chunk["data"])
        stream, sink = self.streams[name], None
        if stream is not None:
            stream(chunk)
            sink = getattr(stream, "console", None)
            dropped = getattr(stream, "dropped", 0)
            if dropped != self._dropped.get(name, 0):
                self._dropped[name] = dropped
                w.emit("output_dropped", stream=name, bytes=dropped)
        elif w.conf.forward_output and not w.conf.options["close_child_" + name]:
            # what an inherited stdout/stderr would have shown, unless nobody reads it
            self._forward(name, self._forwarded.feed((chunk["pid"], name), chunk["data"]))
            sink = _console(1 if name == "stdout" else 2)
        if w.on_output_event is not None:
            w.on_output_event(w, chunk)
        return sink

    def _forward(self, name: str, block: bytes) -> None:
        if block and not _console(1 if name == "stdout" else 2).write(block):
            key = "forwarded " + name
            self._dropped[key] = self._dropped.get(key, 0) + len(block)
            self.w.emit("output_dropped", stream=name, bytes=self._dropped[key])

    def ended(self, pid: int) -> None:
        """Process ``pid`` is reaped and its pipes drained: what it left mid-line goes out."""
        for stream in self.streams.values():
            end = getattr(stream, "end", None)
            if end is not None:
                end(pid)
        for (_, name), block in self._forwarded.end(pid):
            self._forward(name, block)


class Launcher:
    """What a watcher's processes start with: environment, ``$(circus.X)`` variables,
    worker ids, sockets, stdio, fd accounting; builds each Process."""

    def __init__(self, watcher):
        self.w = watcher
        self._env_cache = None
        self._vars_cache = None
        self._free_wids: list = []      # heap of wids given back by exited processes
        self._max_wid = 0
        self._said_fds_short = False

    def forget(self) -> None:
        """Options changed: build the environment and variables again."""
        self._env_cache = self._vars_cache = None

    def env(self) -> dict:
        """The environment its processes get (cached until options change)."""
        if self._env_cache is None:
            env = self.configured_env()
            if self.w.conf.options["ready"] == "notify":
                env["NOTIFY_SOCKET"] = _notify_listener(asyncio.get_event_loop()).address
            self._env_cache = env
        return self._env_cache

    def configured_env(self) -> dict:
        """The environment as circusd builds it: the daemon's (copy_env), its sys.path as
        PYTHONPATH (copy_path), then the configured env, which wins; then the virtualenv's
        bin/ before PATH and its site-packages after PYTHONPATH (no VIRTUAL_ENV)."""
        o = self.w.conf.options
        env = dict(os.environ) if o["copy_env"] else {}
        if o["copy_path"]:
            env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env.update(self.w.conf.env_file)       # environment_file: over the inherited environment
        env.update(self.w.conf.env)
        if o["virtualenv"]:
            venv = o["virtualenv"]
            site = venv_site_packages(venv, o["virtualenv_py_ver"])
            if os.path.isdir(os.path.join(venv, "bin")):
                env["PATH"] = os.path.join(venv, "bin") + os.pathsep + env.get("PATH", os.defpath)
            paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            if site:
                paths = _pth_paths(site) + paths + [site]
            env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        return env

    def vars(self, wid, fds) -> dict:
        """The ``$(circus.X)`` table for one spawn (the static part is cached)."""
        if self._vars_cache is None:
            conf = self.w.conf
            o = conf.options
            table = {k.lower(): v for k, v in conf.free.items()}
            table.update({k: v for k, v in o.items() if v is not None})
            table.update({"use_fds": o["use_sockets"], "working_dir": o["working_dir"] or os.getcwd()})
            table.update({"env." + k.lower(): v for k, v in self.env().items()})
            table.update({"rlimits." + k: v for k, v in conf.rlimits.items()})
            self._vars_cache = table
        table = dict(self._vars_cache)
        table["wid"] = wid
        table.update({"sockets." + k: v for k, v in fds.items()})
        return table

    def next_wid(self) -> int:
        """The smallest free worker id (wids of exited processes are reused)."""
        import heapq
        if self._free_wids:
            return heapq.heappop(self._free_wids)
        self._max_wid += 1
        return self._max_wid

    def release_wid(self, wid):
        import heapq
        heapq.heappush(self._free_wids, wid)

    def socket_fds(self):
        """fds to pass: every socket with use_sockets, and each one cmd/args names.

        so_reuseport sockets are bound fresh per process; returns (fds, to_close).
        """
        o = self.w.conf.options
        text = (o["cmd"] + " " + str(o["args"] or "")).lower()
        fds, fresh = {}, []
        for name, sock in self.w.sockets.items():
            named = ("sockets." + name) in text
            if not (named or o["use_sockets"]):
                continue
            if sock.conf.so_reuseport:
                if named:
                    s = sock.bind_fresh()
                    fresh.append(s)
                    fds[name] = s.fileno()
            elif sock.sock is not None:
                fds[name] = sock.fileno()
        return fds, fresh

    def fds_short(self) -> bool:
        """Would every process wanted, with two pipes and a pidfd each, pass the fd limit?

        Then output with no stream goes straight to the daemon's stdout/stderr
        (as under Circus) instead of through a pipe: 1 fd per process, not 3,
        and `ctl tail` misses it. Said once per watcher.
        """
        w = self.w
        ws = w.arbiter.watchers if w.arbiter is not None else [w]
        wanted = sum(x.numprocesses for x in ws)
        ensure_fds(fds_needed(wanted))      # an incr or add past the limit: lift it now
        limit = fd_limit()
        short = limit is not None and 3 * wanted + 64 > limit
        if short and not self._said_fds_short:
            self._said_fds_short = True
            _log().warning("watcher %s: not enough file descriptors (limit %d) to capture every "
                           "process's output: what has no stream goes straight to the daemon's "
                           "stdout/stderr, and `tail` misses it; raise the limit to capture it",
                           w.name, limit)
        return short

    def death_signal(self) -> int:
        """What the processes get if the daemon dies: parent_death_signal, else stop_signal.
        None as PID 1: the kernel ends the whole namespace with it (one exec per spawn)."""
        if TREES.pid1:
            return 0
        sig = self.w.conf.options["parent_death_signal"]
        return self.w.conf.options["stop_signal"] if sig is None else sig

    def stdin_fd(self):
        name = self.w.conf.options["stdin_socket"]
        if not name:
            return None
        sock = self.w.sockets.get(name.lower())
        if sock is None or sock.sock is None:
            raise ValueError("stdin_socket %r: no such bound socket" % name)
        return sock.fileno()

    def stdio(self) -> dict:
        """Where stdout and stderr go. Always a pipe (for `ctl tail`), except /dev/null when
        asked; without a stream and short of fds, the daemon's own stdout/stderr."""
        o, streams = self.w.conf.options, self.w.output.streams
        piped = {}
        lean = self.fds_short()
        for which in ("stdout", "stderr"):
            if which == "stderr" and o["redirect_stderr"]:
                piped[which] = subprocess.STDOUT
            elif o["close_child_" + which] and streams[which] is None:
                piped[which] = subprocess.DEVNULL
            elif lean and streams[which] is None:     # no pipe: no fd
                piped[which] = (1 if which == "stdout" else 2) if self.w.conf.forward_output \
                    else subprocess.DEVNULL
            else:
                piped[which] = subprocess.PIPE
        return piped

    def process(self, wid: int, fds: dict) -> Process:
        """The Process for worker ``wid`` (not spawned yet)."""
        w, o = self.w, self.w.conf.options
        table = self.vars(wid, fds)
        args = o["args"]
        if isinstance(args, str):
            args = replace_circus_vars(args, table)
        elif args:
            args = [replace_circus_vars(str(a), table) for a in args]
        shell_args = replace_circus_vars(o["shell_args"], table) if o["shell_args"] else None
        piped = self.stdio()
        env = self.env()
        if o["port_base"] is not None:      # Procfile mode: one port per process
            env = dict(env, PORT=str(o["port_base"] + wid - 1))
        return Process(wid, replace_circus_vars(o["cmd"], table), args, working_dir=o["working_dir"],
                       shell=o["shell"], shell_args=shell_args, uid=o["uid"], gid=o["gid"],
                       env=env, rlimits=w.conf.rlimits, executable=o["executable"],
                       pass_fds=fds.values(), stdout=piped["stdout"], stderr=piped["stderr"],
                       close_child_stdin=o["close_child_stdin"],
                       stdin=subprocess.PIPE if "pool" in (w.conf.sv or {}) else self.stdin_fd(),
                       on_output=w.output.write, on_exit=w._on_exit, on_state=w._on_process_state,
                       watcher_name=w.name, umask=o["umask"], death_signal=self.death_signal(),
                       tree=self.branch())

    def branch(self):
        """The watcher's tree (TreeKeeper: its cgroup), made at its first spawn."""
        if self.w.tree is None:
            self.w.tree = TREES.branch(self.w.name)
        return self.w.tree


class Readiness:
    """Keeps a process STARTING until its ``ready`` condition holds (notify, listen, or a
    delay), then has the watcher promote it. After ready_timeout a reload stops waiting
    for it (p.ready is False), but a late READY still counts."""

    def __init__(self, watcher, p: Process):
        o = watcher.conf.options
        self.w, self.p, self.how = watcher, p, o["ready"]
        self.loop = loop = asyncio.get_event_loop()
        p.ready = loop.create_future()
        p.unready = self.gone
        self.watching = []          # the timer or poll task looking for readiness
        self.timeout = loop.call_later(o["ready_timeout"], self.late)
        if self.how == "notify":
            _notify_listener(loop).waiting[p.pid] = self.ready
        elif self.how == "listen":
            self.watching.append(loop.create_task(self.poll()))
        else:
            self.watching.append(loop.call_later(self.how, self.ready))

    def stop_watching(self):
        for h in self.watching:
            h.cancel()
        self.timeout.cancel()
        if self.how == "notify":
            _notify_listener(self.loop).waiting.pop(self.p.pid, None)

    def ready(self):
        self.stop_watching()
        if not self.p.ready.done():
            self.p.ready.set_result(True)
        self.w._promote(self.p)

    def late(self):
        if not self.p.ready.done():
            self.p.ready.set_result(False)
            _log().warning("watcher %s: pid %d not ready after %g s (ready = %s)", self.w.name,
                           self.p.pid, self.w.conf.options["ready_timeout"], self.how)

    def gone(self):             # exited: nothing to wait for any more
        self.stop_watching()
        if not self.p.ready.done():
            self.p.ready.set_result(False)

    async def poll(self):
        p = self.p
        inherited = {s.path if s.path else ("port", s.port)     # ours, so_reuseport ones included
                     for s in self.w.sockets.values()}
        while p.alive and p.state == ProcState.STARTING:
            if await self.loop.run_in_executor(None, _listening, p.pid, inherited):
                return self.ready()
            await asyncio.sleep(0.05)


async def _locked(w, coro_fn):
    """Run ``coro_fn()`` holding the watcher's lock (commands on one watcher queue)."""
    if w.lock is None:
        w.lock = asyncio.Lock()
    async with w.lock:
        return await coro_fn()


async def _none(coro):
    """Await ``coro``; the command's reply has no fields of its own."""
    await coro
    return {}


#: Where a watcher may go from where (Circus's `status` is CIRCUS_STATUS of it), and
#: the event the move emits.
WATCHER_TRANSITIONS = {
    (_S.STOPPED, _S.STARTING): None,
    (_S.STARTING, _S.RUNNING): "start",
    (_S.STARTING, _S.STOPPED): None,            # its output stream could not be opened
    (_S.STARTING, _S.STOPPING): None, (_S.RUNNING, _S.STOPPING): None,
    (_S.STOPPING, _S.STOPPED): "stop",
    # depends_on: it waits for what it depends on, then starts (or is stopped meanwhile)
    (_S.STOPPED, _S.WAITING): "waiting", (_S.WAITING, _S.STARTING): None,
    (_S.WAITING, _S.STOPPED): "stop",
    # oneshot: every process exited 0; `start` runs it again
    (_S.STOPPING, _S.DONE): "done", (_S.DONE, _S.STARTING): None,
    (_S.DONE, _S.WAITING): "waiting", (_S.DONE, _S.STOPPED): "stop",
}
#: What Supervisor's view may show for a watcher's slot with no process in it.
_SHOWN_STATES = frozenset((_S.STOPPED, _S.STARTING, _S.RUNNING, _S.BACKOFF, _S.EXITED, _S.FATAL))


class Watcher:
    """Keeps ``numprocesses`` copies of one command alive.

    Example, inside a running asyncio loop::

        w = Watcher("web", "python -m http.server", numprocesses=2)
        await w.start()
        ...
        await w.stop()

    Options are Circus's watcher keys (see WATCHER_OPTIONS). Events go to
    ``on_event(topic, payload)`` as ``("watcher.web.spawn", {...})``. ``clock``:
    the time and timers of its restart policy (tests pass a fake one).
    """

    # The WatcherConfig as the config file last gave it, kept apart from ``conf``
    # (which incr/set change): reloadconfig applies only what the file changed.
    file_conf: WatcherConfig | None = None
    # Its HealthCheck (health_check), set by the arbiter: told when a process is up and gone.
    health = None

    def __init__(self, name: str, cmd: str | None = None, args=None, *, config: WatcherConfig | None = None,
                 on_event=None, sockets: dict | None = None, arbiter=None, search_dirs=(),
                 clock=None, **options):
        if config is None:
            config = WatcherConfig(name)
        if cmd is not None:
            config.set("cmd", cmd)
        if args is not None:
            config.set("args", args)
        for k, v in options.items():
            config.set(k, v)
        if config.options["cmd"] is None:
            raise ValueError("watcher %s: 'cmd' is required: the command it runs" % name)
        self.conf = config.check()
        self.name = name
        self.on_event = on_event
        self.sockets = sockets if sockets is not None else {}
        self.arbiter = arbiter
        self.search_dirs = tuple(search_dirs)
        self._state = ProcState.STOPPED     # changed by _enter() only; `status` derives from it
        self._shown = ProcState.STOPPED     # Supervisor's view when no process runs (EXITED, FATAL...)
        self.since = time.time()            # when _state was entered
        self.sv_since = None                # when _shown was entered
        self.processes: dict = {}       # pid -> Process counted in numprocesses
        self.retiring: dict = {}        # pid -> Process being stopped (decr, reload, max_age)
        self.output = WatcherOutput(self)
        self.tails = self.output.tails
        self.launcher = Launcher(self)
        self.policy = RestartPolicy.of(self, clock)
        self._topping_up = False        # a spawn_missing() is running
        self.last_error = None          # text of the last spawn failure or crash
        self.lock = None                # asyncio.Lock, serialises commands on this watcher
        self.on_demand_fds = []         # sockets armed to start it (on_demand)
        self.on_output_event = None     # callable(watcher, chunk): `ctl tail -f` followers
        self.flapping = None            # a Flapping, when configured
        self.restarts = 0               # processes replaced after they died
        self._timers: dict = {}         # pid -> max_age timer
        self.finished = 0               # oneshot: processes of this run that exited 0
        self.on_ready = None            # callable(watcher) once ready_now() (set if others depend on it)
        self.tree = None                # its branch of the TreeKeeper (cgroup), once spawned
        for which in ("stdout_stream", "stderr_stream"):
            self.output.check(getattr(config, which))
        for hook in config.hooks.values():
            self._load_hook(hook[0])

    def __repr__(self):
        return "<Watcher %s %s %d/%d>" % (self.name, self.status, len(self.processes), self.numprocesses)

    # -- state ----------------------------------------------------------------
    @property
    def state(self) -> str:
        """STOPPED, STARTING, RUNNING, STOPPING, WAITING or DONE (ProcState); only _enter()
        changes it."""
        return self._state

    @property
    def status(self) -> str:
        """Its state as Circus shows it: stopped, starting, active, stopping, waiting, done."""
        return CIRCUS_STATUS[self._state]

    @property
    def sv_state(self) -> str:
        """What Supervisor's view shows when no process runs (EXITED, BACKOFF, FATAL...)."""
        return self._shown

    @property
    def running(self) -> bool:
        """Starting or started: processes are kept alive."""
        return self._state in (ProcState.STARTING, ProcState.RUNNING)

    def _up(self) -> int:
        """Its processes up and ready: RUNNING, which a process reaches at spawn, after
        startsecs, or once ready (`ready = notify|listen|delay`) as the case may be."""
        return sum(1 for p in self.processes.values() if p.alive and p.state == ProcState.RUNNING)

    def ready_now(self) -> bool:
        """Every process the watcher should have is up and ready (RUNNING: at spawn, after
        startsecs, or once its `ready` check passed, as configured); a oneshot: DONE."""
        if self.conf.options["oneshot"]:
            return self._state == ProcState.DONE
        return self.running and self._up() >= self.numprocesses

    def not_ready_reason(self) -> str | None:
        """Why a probe should wait for it (`ready`, /readyz), or None. A watcher stopped by a
        user, never started, or ended by itself (EXITED: respawn/autorestart off) is not
        waited for; one that gave up (FATAL) or stopped flapping (BACKOFF) is. A `cron` job is
        never waited for (a service's readiness is no scheduled run's business); a process
        its health check found unhealthy (still running: health_action = signal:NAME) is."""
        if self.conf.options["cron"]:
            return None
        if self._state == ProcState.STOPPED:
            if self._shown in (ProcState.FATAL, ProcState.BACKOFF):
                return "%s: %s" % (self._shown, self.last_error or "no reason recorded")
            return None
        if self._state in (ProcState.STOPPING, ProcState.DONE):
            return None
        if self.ready_now():
            return self._unhealthy()
        if self._state == ProcState.WAITING:
            return self.waiting_for()
        if self.conf.options["oneshot"]:
            return "running once (oneshot), not done yet"
        why = "%d of %d processes ready" % (self._up(), self.numprocesses)
        if self._shown == ProcState.BACKOFF and self.last_error:
            why += " (%s)" % self.last_error
        return why

    def _unhealthy(self) -> str | None:
        """Its running processes that failed health_failures probes in a row, as a reason."""
        states = [(pid, self.health.state(pid)) for pid in self.processes] if self.health is not None else []
        sick = ["pid %d (%s)" % (pid, h["reason"]) for pid, h in states if h and h["unhealthy"]]
        return "unhealthy: %s" % ", ".join(sick) if sick else None

    def waiting_for(self) -> str:
        """What a WAITING watcher waits for (its depends_on that are not ready)."""
        deps = self.arbiter.dependencies_of(self) if self.arbiter is not None else []
        names = [d.name for d in deps if not d.ready_now()]
        # none: they just got ready, its start is queued
        return "waiting for %s" % ", ".join(names) if names else "starting: what it depends on is ready"

    def _enter(self, to: str | None = None, shown: str | None = None, **payload) -> None:
        """The one way its state changes: to state ``to``, checked against WATCHER_TRANSITIONS,
        and/or ``shown`` (Supervisor's view of an empty slot); timestamped; the event
        the table names for the move is emitted with ``payload``."""
        event = None
        if to is not None and to != self._state:
            event = _transition(WATCHER_TRANSITIONS, self, self._state, to)
            self._state, self.since = to, time.time()
        if shown is not None:
            if shown not in _SHOWN_STATES:
                raise RuntimeError("%r: %s is not a state a slot shows" % (self, shown))
            self._shown, self.sv_since = shown, time.time()
        if event:
            self.emit(event, **payload)

    def _on_process_state(self, p: Process, event: str) -> None:
        self.emit(event, process_pid=p.pid, state=p.state)

    def _maybe_ready(self) -> None:
        """Tell whoever waits for it (depends_on) once it is ready: no polling."""
        if self.on_ready is not None and self.ready_now():
            self.on_ready(self)

    # -- options ------------------------------------------------------------
    def opt(self, key) -> object:
        """The current value of one option (WATCHER_OPTIONS)."""
        return self.conf.options[key]

    @property
    def numprocesses(self) -> int:
        """How many processes it keeps running."""
        return self.conf.options["numprocesses"]

    @property
    def priority(self) -> int:
        """Start order: higher first (Circus's rule)."""
        return self.conf.options["priority"]

    @property
    def boot_priority(self) -> int:
        """Order at boot and shutdown: a Supervisor [group:x] goes as a whole, by its own
        priority (its members keep theirs for `start g:*` / `stop g:*`)."""
        g = self.conf.group_priority
        return self.priority if g is None else g

    @property
    def topic_name(self) -> str:
        """Its name in event topics: lower case, spaces as underscores."""
        return self.name.lower().replace(" ", "_")

    def options(self) -> dict:
        """Options as the ``options`` command shows them."""
        o = self.conf.options
        out = {k: o[k] for k in VISIBLE_OPTIONS if k in o}
        out["working_dir"] = o["working_dir"] or os.getcwd()
        out["env"] = self.launcher.configured_env()     # circusd: the whole environment the processes get
        for which in ("stdout_stream", "stderr_stream"):
            conf = {k: v for k, v in getattr(self.conf, which).items() if k != "class"}
            # Circus shows null for a watcher added without streams, {} for a config one
            out[which + "_conf"] = None if (not conf and self.conf.added) else conf
        out.update(self.conf.free)
        return dict(sorted(out.items()))

    def env(self) -> dict:
        """The environment its processes get."""
        return self.launcher.env()

    def _load_hook(self, path):
        try:
            return import_dotted(path, self.search_dirs)
        except ImportError as e:
            raise ValueError("hook %r cannot be imported: %s" % (path, e)) from None

    # -- events and hooks -----------------------------------------------------
    def emit(self, event: str, **payload) -> None:
        """Publish ``watcher.<name>.<event>`` with ``payload`` (+ time)."""
        payload.setdefault("time", time.time())
        if self.on_event is not None:
            try:
                self.on_event("watcher.%s.%s" % (self.topic_name, event), payload)
            except Exception:
                _log().exception("event listener failed on %s", event)

    def call_hook(self, name: str, **kw) -> bool:
        """Run a configured hook; False means: abort what it guards."""
        spec = self.conf.hooks.get(name)
        if not spec:
            return True
        path, ignore_failure = spec
        try:
            func = self._load_hook(path)
            result = func(watcher=self, arbiter=self.arbiter, hook_name=name, **kw)
        except (Exception, SystemExit) as e:    # a hook never ends the daemon
            _log().error("hook %s (%s) of watcher %s failed: %s", name, path, self.name, e)
            self.emit("hook_failure", name=name, error=str(e))
            return ignore_failure or name in _IGNORED_HOOK_FAILURES
        self.emit("hook_success", name=name)
        return bool(result) or name in _IGNORED_HOOK_FAILURES

    # -- spawning ----------------------------------------------------------------
    def spawn_process(self) -> Process | None:
        """Start one process now; returns it, or None when the spawn failed."""
        o = self.conf.options
        if not self.call_hook("before_spawn"):
            self.policy.give_up("before_spawn hook refused the spawn")
            return None
        launcher = self.launcher
        wid = launcher.next_wid()
        fresh = []
        try:
            fds, fresh = launcher.socket_fds()
            p = launcher.process(wid, fds)
            # Supervisor: RUNNING only once it has stayed up startsecs (or got ready);
            # a oneshot is ready when it is done, not before
            gated = not o["oneshot"] and (o["ready"] is not None or bool(o["startsecs"]))
            p.spawn(starting=gated)
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            launcher.release_wid(wid)
            self.last_error = "spawn failed: %s" % (e,)
            _log().error("watcher %s: cannot spawn %r: %s", self.name, o["cmd"], e)
            self.policy.spawn_failed(e)
            self.emit("spawn_failed", error=self.last_error, failures=self.policy.failures, time=time.time())
            return None
        finally:
            for s in fresh:
                s.close()
        self.processes[p.pid] = p
        if self.policy.starved:
            self.policy.spawned()
        _log().debug("watcher %s: spawned pid %d (wid %d)", self.name, p.pid, wid)
        if gated and o["ready"] is not None:
            Readiness(self, p)
        elif gated:
            p.promote = asyncio.get_event_loop().call_later(o["startsecs"], self._promote, p)
        self.emit("spawn", process_pid=p.pid, time=p.started, state=p.state)
        if self.health is not None and p.state == ProcState.RUNNING:
            self.health.up(p)
        if not self.call_hook("after_spawn", pid=p.pid):
            self.processes.pop(p.pid, None)
            self.retiring[p.pid] = p
            p.send_signal(signal.SIGKILL)
            self.policy.give_up("after_spawn hook refused pid %d" % p.pid)
            return None
        if o["max_age"] > 0:
            import random
            delay = o["max_age"] + random.randint(0, max(0, o["max_age_variance"]))
            self._timers[p.pid] = asyncio.get_event_loop().call_later(delay, self._expire, p)
        if not gated:
            self._maybe_ready()
        return p

    async def spawn_missing(self, force=0) -> None:
        """Top up to numprocesses (plus ``force`` extra), yielding to the loop every 5 ms.

        One top-up at a time: a wave of deaths must not start a spawning task
        per death, whose turns would then add up between two loop iterations.
        """
        topping_up = not force      # a reload's extra generation runs beside a top-up
        if topping_up:
            if self._topping_up:
                return          # the one running will get there
            self._topping_up = True
        o = self.conf.options
        try:
            pause = time.monotonic() + 0.005
            while self.running and (force > 0 or len(self.processes) + self.finished < self.numprocesses):
                if self.policy.stop_pending:
                    return          # given up while starting: the queued stop waits for this loop
                if self.arbiter is not None and self.arbiter.stopping:
                    return          # quitting: what runs is about to be stopped
                if self.policy.pending and not force:
                    return          # a backoff is pending: it will top up
                p = self.spawn_process()
                if p is None:
                    return
                force -= 1
                if o["warmup_delay"]:
                    await asyncio.sleep(o["warmup_delay"])
                elif time.monotonic() > pause:
                    await asyncio.sleep(0)      # keep the control channel answering
                    pause = time.monotonic() + 0.005
        finally:
            if topping_up:
                self._topping_up = False

    def top_up(self) -> None:
        """Top up in the background (a backoff ended)."""
        asyncio.get_event_loop().create_task(self.spawn_missing())

    def queue(self, coro_fn) -> None:
        """Run ``coro_fn()`` in the background, behind the commands queued on this watcher."""
        asyncio.get_event_loop().create_task(self.arbiter_guard(_locked(self, coro_fn)))

    # -- process events ---------------------------------------------------------
    def _promote(self, p):
        """STARTING -> RUNNING: startsecs passed, or the process became ready."""
        p.promote = None
        if p.alive and p.state == ProcState.STARTING:
            self.policy.process_up()
            p.enter(ProcState.RUNNING)
            if self.health is not None:
                self.health.up(p)
            self._maybe_ready()

    async def wait_ready(self, procs) -> list:
        """Wait for the readiness of ``procs``; returns those that did not make it."""
        futures = [p.ready for p in procs if p.ready is not None]
        if futures:     # asyncio.wait: a cancelled caller must not cancel the futures
            await asyncio.wait(futures)
        return [p for p in procs if p.ready is not None and not p.ready.result() or not p.alive]

    async def _replace_when_ready(self, new, expected):
        """Zero-downtime or nothing: unless ``expected`` new processes all got ready, the
        new ones stop and the old ones (still running) stay, topped up if one died."""
        failed = await self.wait_ready(new)
        if not failed and len(new) >= expected:
            return
        self._user_action(False)        # cancel a give-up or flapping stop queued meanwhile
        await asyncio.gather(*(self._stop_process(p) for p in new))
        self.policy.process_up()
        await self.spawn_missing()
        what = ("%d of %d new processes not ready within %g s (ready = %s)"
                % (len(failed) + expected - len(new), expected, self.conf.options["ready_timeout"],
                   self.conf.options["ready"]))
        if len(new) < expected:
            what = "%d of %d new processes could not be spawned (%s)" % (
                expected - len(new), expected, self.last_error)
        raise CommandError("reload of %s aborted: %s; the old ones keep running" % (self.name, what),
                           E_COMMAND_ERROR)

    def _on_exit(self, p: Process):
        counted = self.processes.pop(p.pid, None) is not None
        self.output.ended(p.pid)
        self.retiring.pop(p.pid, None)
        self.launcher.release_wid(p.wid)
        timer = self._timers.pop(p.pid, None)
        if timer is not None:
            timer.cancel()
        if p.promote is not None:
            p.promote.cancel()
            p.promote = None
        if p.unready is not None:           # died before it was ready: stop waiting
            p.unready()
        if self.health is not None:
            self.health.gone(p)
        now = self.policy.clock.time()
        o = self.conf.options
        if not p.stopping and (o["stop_children"] or o["stopasgroup"] or o["killasgroup"]):
            p.signal_group(o["stop_signal"])    # what it left in its group (pid just reaped: not reused yet)
        self.call_hook("before_reap", process_pid=p.pid, time=now)
        self.emit("reap", process_pid=p.pid, time=now, exit_code=p.returncode, state=p.state)
        self.call_hook("after_reap", process_pid=p.pid, time=now, exit_code=p.returncode,
                       process_status=p.state)
        if counted and not p.stopping and self.running and not self.policy.stop_pending:
            _log().info("watcher %s: pid %d exited (%s)", self.name, p.pid, describe_exit(p.returncode))
            self.policy.exited(p, now)

    async def arbiter_guard(self, coro):
        """Await ``coro``, logging (never raising) what goes wrong: for background tasks."""
        try:
            return await coro
        except CircusError as e:
            _log().error("watcher %s: %s", self.name, e)
        except Exception:
            _log().exception("watcher %s: unexpected error", self.name)

    def _user_action(self, by_flapping):
        self.policy.user_action(by_flapping)

    def _expire(self, p):
        """max_age reached: a new process first, then the old one stops gracefully."""
        self._timers.pop(p.pid, None)
        if self.processes.pop(p.pid, None) is None:
            return
        self.retiring[p.pid] = p
        loop = asyncio.get_event_loop()
        loop.create_task(self.spawn_missing())
        loop.create_task(self._stop_process(p))

    def restart_process(self, p: Process) -> None:
        """In the background: stop ``p`` the usual way (hooks, stopasgroup,
        graceful_timeout), then top up again."""
        async def restart():
            if p.pid in self.processes:
                await self._stop_process(p)
                await self.manage()
        self.queue(restart)

    async def _stop_process(self, p: Process, sig=None):
        o = self.conf.options
        sig = o["stop_signal"] if sig is None else sig
        self.processes.pop(p.pid, None)
        if p.alive:
            self.retiring[p.pid] = p
        if not p.alive:
            return
        if not self.call_hook("before_signal", pid=p.pid, signum=sig):
            sig = signal.SIGKILL if sig == signal.SIGKILL else None
        if sig is None:
            return
        p.enter(ProcState.STOPPING)         # announced (a `kill` is not)
        await p.stop(sig, o["graceful_timeout"], o["stop_children"],
                     on_kill=lambda proc: self.emit("kill", process_pid=proc.pid),
                     group=o["stopasgroup"])
        self.call_hook("after_signal", pid=p.pid, signum=sig)

    # -- lifecycle ---------------------------------------------------------------
    def _close_streams(self, final=False):
        self.output.close(final)

    async def start(self, by_flapping=False) -> dict:
        """Start (or top up) the processes; returns {"started": [pids], "kept": [pids]}."""
        self._user_action(by_flapping)
        kept = list(self.processes)
        if self.running:
            await self.spawn_missing()
            return {"started": [p for p in self.processes if p not in kept], "kept": kept}
        if self.arbiter is not None and not self.arbiter.dependencies_ready(self):
            self._enter(ProcState.WAITING, ProcState.STOPPED)     # the "waiting" event
            return {"started": [], "kept": []}      # the arbiter starts it once they are ready
        if not self.call_hook("before_start"):
            _log().warning("watcher %s: before_start hook said no", self.name)
            return {"started": [], "kept": []}
        self._enter(ProcState.STARTING, ProcState.STARTING)
        self.policy.failures = 0
        self.finished = 0
        self.last_error = None
        try:
            self.output.open()
        except (OSError, ValueError) as e:
            self.last_error = "cannot open its output stream: %s" % (os_error_text(e) if
                                                                      isinstance(e, OSError) else e,)
            self._enter(ProcState.STOPPED, ProcState.FATAL)
            raise CommandError("watcher %s: %s" % (self.name, self.last_error), E_OS_ERROR) from None
        await self.spawn_missing()
        if self._state != ProcState.STARTING or self.policy.stop_pending:
            return {"started": list(self.processes), "kept": []}
        if not self.call_hook("after_start"):
            await self.stop()
            return {"started": [], "kept": []}
        self._enter(ProcState.RUNNING)      # the "start" event
        _log().info("watcher %s started (%d processes)", self.name, len(self.processes))
        self._maybe_ready()
        return {"started": list(self.processes), "kept": []}

    async def stop(self, final_state=ProcState.STOPPED, by_flapping=False) -> None:
        """Stop every process (stop_signal, then SIGKILL after graceful_timeout).

        ``final_state`` is what `status --long` shows afterwards (STOPPED, or
        EXITED / FATAL / BACKOFF when the watcher ended by itself); DONE: a oneshot
        whose processes all exited 0.
        """
        self._user_action(by_flapping)
        if self._state == ProcState.STOPPED:
            if not by_flapping and self._shown == ProcState.BACKOFF:
                self.last_error = None
                self._enter(shown=ProcState.STOPPED)
            return
        if self._state in (ProcState.WAITING, ProcState.DONE):     # nothing runs
            self._enter(ProcState.STOPPED, ProcState.STOPPED, state=ProcState.STOPPED)
            return
        self.policy.cancel()
        self._enter(ProcState.STOPPING)
        self.call_hook("before_stop")
        procs = list(self.processes.values()) + list(self.retiring.values())
        await asyncio.gather(*(self._stop_process(p) for p in procs))
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()
        if self.tree:
            TREES.kill(self.tree)       # what its processes (the earlier ones too) left behind
        self.output.close()
        if final_state == ProcState.DONE:
            self._enter(ProcState.DONE, ProcState.EXITED)      # the "done" event
        else:
            self._enter(ProcState.STOPPED, final_state, state=final_state)     # the "stop" event
        self.call_hook("after_stop")
        _log().info("watcher %s %s", self.name, "done" if final_state == ProcState.DONE else "stopped")
        self._maybe_ready()

    async def until_running(self) -> None:
        """supervisorctl's wait: until each STARTING process is RUNNING (startsecs);
        CommandError if one exits first. Circus watchers (no startsecs) do not wait."""
        startsecs = self.conf.options["startsecs"]
        if startsecs is None:
            return
        starting = [p for p in self.processes.values() if p.state == ProcState.STARTING]
        while any(p.alive and p.state == ProcState.STARTING for p in starting):
            await asyncio.sleep(0.05)
        for p in starting:
            if not p.alive:
                raise CommandError("%s: abnormal termination: pid %d %s within startsecs = %g"
                                   % (self.name, p.pid, describe_exit(p.returncode), startsecs))

    async def restart(self) -> dict:
        """Stop, then start; returns stopped/started/kept pids."""
        stopped = list(self.processes)
        await self.stop()
        info = await self.start()
        info["stopped"] = stopped
        return info

    async def reload(self, graceful=True, sequential=False) -> dict:
        """New processes replace the old ones; SIGHUP instead with send_hup."""
        if self._state in (ProcState.STOPPED, ProcState.WAITING, ProcState.DONE):
            info = await self.start()
            info["stopped"] = []
            return info
        if self.conf.options["send_hup"]:
            for p in self.processes.values():
                p.send_signal(signal.SIGHUP)
            return {"stopped": [], "started": [], "kept": list(self.processes)}
        if self.conf.options["oneshot"]:    # a task runs to its end: not cut off, no copy beside it
            return {"stopped": [], "started": [], "kept": list(self.processes)}
        if not graceful:
            return await self.restart()
        old = list(self.processes.values())
        started = []
        if sequential:
            for p in old:
                if self.conf.options["ready"] is None:
                    await self._stop_process(p)
                new = self.spawn_process()
                if new is not None:
                    started.append(new.pid)
                if self.conf.options["ready"] is not None:
                    await self._replace_when_ready([new] if new is not None else [], 1)
                await self._stop_process(p)
                if self.conf.options["warmup_delay"]:
                    await asyncio.sleep(self.conf.options["warmup_delay"])
        else:
            before = set(self.processes)
            await self.spawn_missing(force=self.numprocesses)
            new = [p for pid, p in self.processes.items() if pid not in before]
            started = [p.pid for p in new]
            await self._replace_when_ready(new, self.numprocesses)
            await asyncio.gather(*(self._stop_process(p) for p in old))
        self.emit("reload")
        return {"stopped": [p.pid for p in old], "started": started, "kept": []}

    async def manage(self) -> None:
        """Bring the number of processes to numprocesses (spawn or retire extras)."""
        if not self.running:
            return
        extra = len(self.processes) - self.numprocesses
        if extra > 0:
            oldest = sorted(self.processes.values(), key=lambda p: p.started)[:extra]
            await asyncio.gather(*(self._stop_process(p) for p in oldest))
        else:
            await self.spawn_missing()

    async def set_numprocesses(self, n: int) -> int:
        """Change how many processes run; spawns or retires at once."""
        if self.conf.options["singleton"] and n > 1:
            raise MessageError("watcher %s is a singleton: numprocesses can only be 0 or 1" % self.name)
        self.conf.options["numprocesses"] = max(0, n)
        await self.manage()
        return self.numprocesses

    async def set_options(self, options: dict) -> None:
        """Apply ``set`` options; a change to the command line reloads the watcher."""
        reload_needed = False
        for key, value in options.items():
            try:
                if key == "numprocesses" and self.conf.options["singleton"] and to_int(value) > 1:
                    raise ValueError("a singleton watcher can only have 0 or 1 process")
                self.conf.set(key, value)
            except ValueError as e:
                raise MessageError("%s: %s" % (key, e)) from None
            self.launcher.forget()
            if key == "startsecs":      # Circus's rules or Supervisor's
                self.policy = RestartPolicy.of(self, before=self.policy)
            if key in ("cmd", "args", "env", "working_dir", "uid", "gid", "shell", "shell_args",
                       "executable", "copy_env", "copy_path", "max_age", "max_age_variance") \
                    or key.startswith("rlimit_"):
                reload_needed = True
            elif key.startswith(("stdout_stream", "stderr_stream")):
                which = "stdout" if key.startswith("stdout") else "stderr"
                self.output.check(getattr(self.conf, which + "_stream"))
                if self._state != ProcState.STOPPED:
                    reload_needed = self.output.rebuild(which) or reload_needed
            elif key.startswith("hooks"):
                for hook in self.conf.hooks.values():
                    self._load_hook(hook[0])
            self.emit("updated", key=key)
        if reload_needed and self._state != ProcState.STOPPED:
            await self.reload()
        else:
            await self.manage()

    def send_signal(self, signum, pid=None, childpid=None, children=False, recursive=False) -> None:
        """The ``signal`` command: to processes, their children, or a whole tree."""
        if pid is not None:
            if pid not in self.processes:
                raise MessageError("process %s not found in %r" % (pid, self.name))
            targets = [self.processes[pid]]
        else:
            if childpid is not None:
                raise CommandError("childpid needs pid: the watcher process it is a child of")
            targets = list(self.processes.values())
        refused = []
        for p in targets:
            if not self.call_hook("before_signal", pid=p.pid, signum=signum) and signum != signal.SIGKILL:
                continue
            if childpid is not None:
                kids = [c for c in p.children() if c.pid == childpid]
                if not kids:
                    raise MessageError("child %s not found in process %s" % (childpid, p.pid))
                kids[0].send_signal(signum)
            elif children:
                p.signal_children(signum)
            else:
                p.signalled = True
                if not p.send_signal(signum):
                    refused.append(p.pid)
                if recursive:
                    p.signal_children(signum, recursive=True)
            self.call_hook("after_signal", pid=p.pid, signum=signum)
        if refused:
            raise CommandError("the kernel refused %s for pid %s (see the daemon's log)"
                               % (signame(signum), ", ".join(map(str, refused))), E_OS_ERROR)

    async def kill(self, signum=None, pid=None, graceful_timeout=None) -> None:
        """The ``kill`` command: stop (then SIGKILL) processes; respawn refills them."""
        o = self.conf.options
        sig = o["stop_signal"] if signum is None else signum
        timeout = o["graceful_timeout"] if graceful_timeout is None else graceful_timeout
        if pid is not None:
            if pid not in self.processes:
                raise MessageError("process %s not found in %r" % (pid, self.name))
            procs = [self.processes[pid]]
        else:
            procs = list(self.processes.values())
        await asyncio.gather(*(p.stop(sig, timeout, o["stop_children"],
                                      on_kill=lambda proc: self.emit("kill", process_pid=proc.pid))
                               for p in procs))
        await self.manage()


# ---------------------------------------------------------------------------
# 11. Monitoring: process stats, resource watchdog, stats records, /metrics text
# ---------------------------------------------------------------------------
# Each part runs only when configured, and the samplers only while someone
# looks: an idle daemon still never wakes up.

_PS_CACHE: dict = {}      # pid -> psutil.Process, so cpu_percent measures since last time


def _children_map() -> dict:
    """ppid -> [pid] for the whole machine, read once per stats request
    (psutil's children() rescans every process each time: O(N^2) for N)."""
    kids: dict = {}
    for proc in _psutil.process_iter(["ppid"]):
        kids.setdefault(proc.info["ppid"], []).append(proc.pid)
    return kids


def process_stats(pid: int, kids_of=None, cache=None) -> dict:
    """psutil figures for one pid, in Circus's record format (+ its children's).

    ``cache``: the caller's psutil objects (cpu% since the caller last looked).
    """
    cache = _PS_CACHE if cache is None else cache
    p = cache.get(pid)
    try:
        if p is None:
            p = cache[pid] = _psutil.Process(pid)
        with p.oneshot():
            info = {"pid": pid}
            try:
                mem = p.memory_info()
                info["mem_info1"], info["mem_info2"] = human_size(mem.rss), human_size(mem.vms)
            except _psutil.AccessDenied:
                info["mem_info1"] = info["mem_info2"] = "N/A"
            for key, fn in (("cpu", lambda: p.cpu_percent(None)),
                            ("mem", lambda: round(p.memory_percent(), 3)),
                            ("ctime", lambda: human_cputime(sum(p.cpu_times()[:2]))),
                            ("username", p.username), ("nice", p.nice),
                            ("create_time", p.create_time)):
                try:
                    info[key] = fn()
                except (_psutil.AccessDenied, KeyError):
                    info[key] = "N/A"
            try:
                argv = p.cmdline()
                info["cmdline"] = os.path.basename(argv[0].split()[0]) if argv else "N/A"
            except (_psutil.AccessDenied, IndexError):
                info["cmdline"] = "N/A"
            info["age"] = time.time() - info["create_time"] if isinstance(info["create_time"], float) else "N/A"
        info["children"] = [process_stats(c, None, cache) for c in (kids_of or {}).get(pid, ())]
        return info
    except _psutil.NoSuchProcess:
        cache.pop(pid, None)
        return "No such process (stopped?)"


def _sample(pids, cache: dict) -> dict:
    """pid -> (rss bytes, cpu %) for live pids (run in a worker thread).

    ``cache`` holds one consumer's psutil objects (cpu% is "since this
    consumer last looked"); it is pruned to the pids sampled.
    """
    out = {}
    for pid in pids:
        p = cache.get(pid)
        try:
            if p is None:
                p = cache[pid] = _psutil.Process(pid)
            out[pid] = (p.memory_info().rss, p.cpu_percent(None))
        except _psutil.Error:
            pass
    for pid in [p for p in cache if p not in out]:
        del cache[pid]
    return out


class Watchdog:
    """Resource limits of one watcher: ``max_rss`` and ``max_cpu`` (percent of a core).

    Checked every ``watchdog_interval`` seconds while the watcher is active;
    a process over a limit for ``watchdog_grace`` checks in a row gets a
    ``watchdog`` event and is restarted (stopped gracefully, then respawned),
    or sent ``watchdog_signal`` instead when that is set.
    """

    def __init__(self, watcher, options=None):
        o = options or watcher.conf.options
        self.watcher = watcher
        self.cache: dict = {}           # its own psutil objects: cpu% since its own last look
        self.stopped = False
        self.max_rss = o["max_rss"]
        self.max_cpu = o["max_cpu"]
        self.interval = max(0.1, o["watchdog_interval"])
        self.grace = max(1, o["watchdog_grace"])
        self.signal = o["watchdog_signal"]
        self.strikes: dict = {}
        self._handle = None
        self._loop = None

    def start(self, loop):
        self._loop = loop
        if self._handle is None:
            self._handle = loop.call_later(self.interval, self._tick)

    def stop(self):
        self.stopped = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self):
        self._handle = None
        w = self.watcher
        if self.stopped:
            return
        if w.state != ProcState.RUNNING or not w.processes:
            self.strikes.clear()
            self._handle = self._loop.call_later(self.interval, self._tick)
            return
        fut = self._loop.run_in_executor(None, _sample, list(w.processes), self.cache)
        fut.add_done_callback(self._judge)

    def _judge(self, fut):
        w = self.watcher
        if self.stopped:
            return
        samples = fut.result() if not fut.exception() else {}
        for pid in [p for p in self.strikes if p not in samples]:
            del self.strikes[pid]
        for pid, (rss, cpu) in samples.items():
            over = []
            if self.max_rss is not None and rss > self.max_rss:
                over.append(("rss", rss, self.max_rss))
            if self.max_cpu is not None and cpu > self.max_cpu:
                over.append(("cpu", cpu, self.max_cpu))
            if not over:
                self.strikes.pop(pid, None)
                continue
            self.strikes[pid] = self.strikes.get(pid, 0) + 1
            if self.strikes[pid] < self.grace or pid not in w.processes:
                continue
            del self.strikes[pid]
            what, value, limit = over[0]
            action = "signal %s" % signame(self.signal) if self.signal else "restart"
            _log().warning("watcher %s: pid %d over its %s limit (%s > %s) %d times: %s", w.name, pid,
                           what, value, limit, self.grace, action)
            w.emit("watchdog", process_pid=pid, limit=what, value=value, max=limit, action=action)
            if self.signal:
                w.processes[pid].send_signal(self.signal)
            else:
                w.restart_process(w.processes[pid])
        if self._loop is not None and not self._loop.is_closed():
            self._handle = self._loop.call_later(self.interval, self._tick)


async def _net_probe(kind, host, port, path):
    """One tcp:// or http:// probe (the caller bounds its time): None when healthy, else why not.
    HTTP: a GET answered with a 2xx or 3xx status."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if kind == "tcp":
            return None
        name = "[%s]" % host if ":" in host else host
        writer.write(("GET %s HTTP/1.0\r\nHost: %s:%d\r\nUser-Agent: circus.py health check\r\n"
                      "Connection: close\r\n\r\n" % (path, name, port)).encode("utf-8"))
        await writer.drain()
        line = await reader.readline()
        parts = line.split()
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            return "no HTTP status line in the reply" if line else "closed without a reply"
        code = int(parts[1])
        return None if 200 <= code < 400 else "HTTP %d" % code
    finally:
        writer.close()


async def _exec_probe(w, cmd: str, timeout: float):
    """One exec: probe: ``cmd`` by /bin/sh as the watcher's processes run (user, folder,
    environment), in a process group and a leaf of the watcher's tree of its own (TreeKeeper),
    all of it killed once it ends, times out or the wait is cancelled (the process it checks
    is gone): nothing it started outlives it, setsid'ed ones included. Exit 0 is healthy."""
    o = w.conf.options
    out = bytearray()

    def keep(chunk):        # the end of its output says why it failed
        out.extend(chunk["data"])
        del out[:-512]
    check = Process(0, cmd, shell=True, working_dir=o["working_dir"], uid=o["uid"], gid=o["gid"],
                    env=w.env(), on_output=keep, stderr=subprocess.STDOUT, watcher_name=w.name,
                    death_signal=0 if TREES.pid1 else signal.SIGKILL, tree=w.tree)
    try:
        check.spawn()
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return "cannot run it: %s" % (os_error_text(e) if isinstance(e, OSError) else e)
    try:
        code = await check.wait(timeout)
    finally:
        if check.alive or check.tree:       # (no tree: a Watcher used from Python)
            check.kill_tree(signal.SIGKILL)
    if code is None:
        return "timed out after %g s" % timeout
    lines = bytes(out).decode("utf-8", "replace").strip().splitlines()
    return None if code == 0 else describe_exit(code) + (": " + lines[-1][:200] if lines else "")


class HealthCheck:
    """``health_check`` of one watcher's processes.

    Each process, once up (spawned, or past startsecs, or ready), is probed
    every ``health_interval`` s, for ``health_timeout`` s at most; after
    ``health_failures`` failed probes in a row it gets ``health_action`` and an
    ``unhealthy`` event (``healthy`` when it passes again). Probes are asyncio
    connections and subprocesses: a hung one holds up nothing else. A process
    has one timer or one probe at a time; no process, no timer. ``probe``:
    async (process) -> None or why not (tests pass their own).
    """

    def __init__(self, watcher, clock=None, probe=None):
        o = watcher.conf.options
        self.w = watcher
        self.clock = clock or CLOCK
        self.check = o["health_check"]
        self.interval, self.timeout = o["health_interval"], o["health_timeout"]
        self.limit, self.action = o["health_failures"], o["health_action"]
        self.probe = probe or self._probe
        self.pending: dict = {}     # pid -> timer of its next probe, or the running probe's task
        self.health: dict = {}      # pid -> {"ok": last probe passed (None: none yet), "failures", "reason", "unhealthy"}
        self.failed = 0             # failed probes in all (a /metrics counter)

    def up(self, p) -> None:
        """``p`` is up: its first probe in health_interval."""
        if p.pid not in self.pending:
            self.health.setdefault(p.pid, {"ok": None, "failures": 0, "reason": "", "unhealthy": False})
            self._next(p)

    def gone(self, p) -> None:
        """``p`` exited or stops: no more probes (a running one is cancelled, its group killed)."""
        handle = self.pending.pop(p.pid, None)
        if handle is not None:
            handle.cancel()
        self.health.pop(p.pid, None)

    def stop(self) -> None:
        for handle in self.pending.values():
            handle.cancel()
        self.pending.clear()
        self.health.clear()

    def _next(self, p):
        self.pending[p.pid] = self.clock.call_later(self.interval, lambda: self._due(p))

    def _checked(self, p) -> bool:
        return p.alive and self.w.processes.get(p.pid) is p and p.state == ProcState.RUNNING

    def _due(self, p):
        if not self._checked(p):
            return self.gone(p)
        self.pending[p.pid] = asyncio.get_event_loop().create_task(self._run(p))

    async def _run(self, p):
        why = await self.probe(p)
        self.pending.pop(p.pid, None)
        self.judge(p, why)

    def target(self, p) -> tuple:
        """health_target of ``p``: $(circus.wid) its wid, $(circus.sockets.NAME) a socket's
        address (HOST:PORT, or the path of a unix socket)."""
        socks = {name: s.path or ("[%s]:%s" if ":" in str(s.host) else "%s:%s") % (s.host, s.port)
                 for name, s in self.w.sockets.items()}
        return health_target(replace_circus_vars(self.check, self.w.launcher.vars(p.wid, socks)))

    async def _probe(self, p):
        try:
            kind, what, port, path = self.target(p)
            if kind == "exec":
                return await _exec_probe(self.w, what, self.timeout)
            return await asyncio.wait_for(_net_probe(kind, what, port, path), self.timeout)
        except asyncio.TimeoutError:
            return "timed out after %g s" % self.timeout
        except OSError as e:        # refused, unreachable, no such host
            return os.strerror(e.errno) if e.errno else str(e)
        except ValueError as e:     # $(circus.X) made it no address
            return str(e)

    def judge(self, p, why) -> None:
        """One probe's result (``why`` None: passed): counted, acted on, the next one timed."""
        if not self._checked(p):        # stopping or gone meanwhile
            return
        h = self.health.setdefault(p.pid, {"ok": None, "failures": 0, "reason": "", "unhealthy": False})
        if why is None:
            if h["unhealthy"]:
                self.w.emit("healthy", process_pid=p.pid)
            h.update(ok=True, failures=0, reason="", unhealthy=False)
        else:
            self.failed += 1
            h.update(ok=False, failures=h["failures"] + 1, reason=why)
            if h["failures"] >= self.limit:
                h.update(failures=0, unhealthy=True)
                if not self._act(p, why):
                    return
        self._next(p)

    def _act(self, p, why) -> bool:
        """health_action on ``p``; True when ``p`` keeps running (signal:NAME)."""
        w, act = self.w, self.action
        _log().warning("watcher %s: pid %d failed its health check %d times in a row (%s): %s",
                       w.name, p.pid, self.limit, why, act)
        w.emit("unhealthy", process_pid=p.pid, failures=self.limit, reason=why, action=act)
        if act.startswith("signal:"):
            p.send_signal(to_signum(act[7:]))
            return True
        if act == "restart":
            w.restart_process(p)
        elif act == "exit" and w.arbiter is not None:      # the container exit policy
            done = w.arbiter.critical_exit(w.name, 1, "is unhealthy and its health_action is exit")
            if asyncio.iscoroutine(done):
                asyncio.get_event_loop().create_task(w.arbiter_guard(done))
        else:       # stop (and exit with no daemon around: a Watcher used from Python)
            # shown FATAL, with why: `status` says it and the probes wait for it (a user's
            # stop they would not)
            w.last_error = "pid %d: %d failed health checks in a row (%s)" % (p.pid, self.limit, why)
            w.queue(lambda: w.stop(ProcState.FATAL))
        return False

    def state(self, pid) -> dict | None:
        """Health of a process: ok (None before its first probe), failures in a row, reason."""
        return self.health.get(pid)

    def describe(self, pid) -> str:
        """For `status`: health: ok, failing 1/3 (why), unhealthy (why); empty before a probe."""
        h = self.health.get(pid)
        if h is None or h["ok"] is None:
            return ""
        if h["ok"]:
            return "health: ok"
        if h["unhealthy"]:
            return "health: unhealthy (%s)" % h["reason"]
        return "health: failing %d/%d (%s)" % (h["failures"], self.limit, h["reason"])


def _stats_records(watchers, cache: dict) -> list:
    """(topic, payload) pairs of the stats channel, Circus's format (worker thread)."""
    kids_of = _children_map()
    seen = set(cache)
    now = time.time()
    out = []
    for name, procs in watchers:
        pids, cpus, mems, ages = [], [], [], []
        for pid, started in procs:
            info = process_stats(pid, kids_of, cache)
            if not isinstance(info, dict):
                continue
            info.update(subtopic=pid, name=None, age=now - started)
            out.append(("stat.%s.%d" % (name, pid), info))
            pids.append(pid)
            if isinstance(info.get("cpu"), (int, float)):
                cpus.append(info["cpu"])
            if isinstance(info.get("mem"), (int, float)):
                mems.append(info["mem"])
            ages.append(info["age"])
        out.append(("stat.%s" % name, {"pid": pids, "cpu": sum(cpus) / len(cpus) if cpus else "N/A",
                                       "mem": sum(mems), "age": max(ages) if ages else 0}))
    me = process_stats(os.getpid(), None, cache)
    live = {pid for _, procs in watchers for pid, _ in procs} | {os.getpid()}
    for pid in seen - live:         # forget processes that are gone (children are re-read)
        cache.pop(pid, None)
    if isinstance(me, dict):
        me.update(subtopic=os.getpid(), name="circusd")
        out.append(("stat.circus.%d" % os.getpid(), me))
        out.append(("stat.circus", {"pid": [os.getpid()], "cpu": me.get("cpu"), "mem": me.get("mem"),
                                    "age": me.get("age")}))
    return out


def _health_fields(w, pid) -> dict:
    """A process's health for the dashboard: healthy (null: not probed yet) and a text."""
    h = w.health.state(pid) if w.health is not None else None
    return {"healthy": h and h["ok"], "health": w.health.describe(pid) if h else ""}


def snapshot_skeleton(arbiter) -> dict:
    """Watchers and processes as they are now (on the loop: cheap, no psutil)."""
    ws = []
    for w in arbiter.watchers:
        procs = sorted(list(w.processes.values()) + [p for p in w.retiring.values() if p.alive],
                       key=lambda p: (p.wid, p.started))
        ws.append({"name": w.name, "status": w.status, "numprocesses": w.numprocesses, "restarts": w.restarts,
                   "flapping": bool(w.last_error and w.last_error.startswith("flapping")
                                    and w.state == ProcState.STOPPED),
                   "last_error": w.last_error or None,
                   "next_run": arbiter.schedules[w].next_run() if w in arbiter.schedules else None,
                   "health_failures": w.health.failed if w.health is not None else None,
                   "processes": [dict({"wid": p.wid, "pid": p.pid, "state": p.state, "started": p.started},
                                      **_health_fields(w, p.pid)) for p in procs]})
    return {"time": time.time(), "watchers": ws,
            "daemon": {"pid": os.getpid(), "version": __version__, "started": arbiter.started}}


def add_usage(snap: dict, cache: dict) -> dict:
    """Fill in CPU % and RSS (worker thread): per process, summed per watcher."""
    me = snap["daemon"]["pid"]
    samples = _sample([p["pid"] for w in snap["watchers"] for p in w["processes"]] + [me], cache)
    for w in snap["watchers"]:
        for p in w["processes"]:
            p["rss"], p["cpu"] = samples.get(p["pid"], (None, None))
        known = [p for p in w["processes"] if p["rss"] is not None]
        w["rss"] = sum(p["rss"] for p in known)
        w["cpu"] = round(sum(p["cpu"] for p in known), 1)
    snap["daemon"]["rss"], snap["daemon"]["cpu"] = samples.get(me, (None, None))
    return snap


_USAGE_LOCK: list = []     # [threading.Lock]: a psutil cache is read by one thread at a time


def _usage_off_loop(snap, cache):
    if not _USAGE_LOCK:         # (made on the loop thread, so only once)
        import threading
        _USAGE_LOCK.append(threading.Lock())

    def fill():
        with _USAGE_LOCK[0]:
            return add_usage(snap, cache)
    return asyncio.get_running_loop().run_in_executor(None, fill)


def _label_value(value) -> str:
    """A label value as the exposition format escapes it: backslash, double quote, newline."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric_line(name, labels, value):
    lab = ",".join('%s="%s"' % (k, _label_value(v)) for k, v in labels.items())
    return "%s{%s} %s" % (name, lab, value) if lab else "%s %s" % (name, value)


def metrics_text(snap: dict) -> str:
    """Prometheus text format (0.0.4) of a snapshot with usage."""
    lines = []

    def family(name, kind, helptext, rows):
        lines.append("# HELP %s %s" % (name, helptext))
        lines.append("# TYPE %s %s" % (name, kind))
        lines.extend(_metric_line(name, labels, value) for labels, value in rows)
    ws = snap["watchers"]
    family("circus_watcher_active", "gauge", "1 while the watcher is active",
           [({"watcher": w["name"]}, int(w["status"] == CIRCUS_STATUS[ProcState.RUNNING])) for w in ws])
    family("circus_watcher_processes", "gauge", "running processes",
           [({"watcher": w["name"]}, sum(p["state"] != ProcState.STOPPING for p in w["processes"]))
            for w in ws])
    family("circus_watcher_numprocesses", "gauge", "processes wanted",
           [({"watcher": w["name"]}, w["numprocesses"]) for w in ws])
    family("circus_watcher_restarts_total", "counter", "processes that died and were replaced",
           [({"watcher": w["name"]}, w["restarts"]) for w in ws])
    family("circus_watcher_flapping", "gauge", "1 while stopped for flapping",
           [({"watcher": w["name"]}, int(w["flapping"])) for w in ws])
    procs = [({"watcher": w["name"], "pid": p["pid"], "wid": p["wid"]}, p)
             for w in ws for p in w["processes"] if p["rss"] is not None]
    family("circus_process_rss_bytes", "gauge", "resident memory", [(lab, p["rss"]) for lab, p in procs])
    family("circus_process_cpu_percent", "gauge", "CPU since the previous scrape",
           [(lab, p["cpu"]) for lab, p in procs])
    family("circus_process_age_seconds", "gauge", "seconds since spawn",
           [(lab, round(snap["time"] - p["started"], 3)) for lab, p in procs])
    family("circus_process_healthy", "gauge", "1 if its last health check passed, 0 if it failed",
           [({"watcher": w["name"], "pid": p["pid"], "wid": p["wid"]}, int(p["healthy"]))
            for w in ws for p in w["processes"] if p.get("healthy") is not None])
    family("circus_watcher_health_failures_total", "counter", "failed health checks",
           [({"watcher": w["name"]}, w["health_failures"]) for w in ws if w.get("health_failures") is not None])
    family("circus_daemon_rss_bytes", "gauge", "the daemon's resident memory",
           [({}, snap["daemon"]["rss"] or 0)])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# 11b. Supervisor event listeners
# ---------------------------------------------------------------------------
# [eventlistener:x] pools speak Supervisor's protocol on their stdin/stdout. The hub
# is one more arbiter listener: it turns the arbiter's events (and the output of
# programs with *_events_enabled or *_capture_maxbytes) into Supervisor's events,
# numbered and buffered per pool as supervisord does. With no pool it does nothing.

_SV_TICKS = (5, 60, 3600)
_SV_COMM_BEGIN, _SV_COMM_END = b"<!--XSUPERVISOR:BEGIN-->", b"<!--XSUPERVISOR:END-->"


def sv_event_is(name: str, wanted: str) -> bool:
    """True if event type ``name`` is ``wanted`` or one of its children."""
    while name is not None:
        if name == wanted:
            return True
        name = SV_EVENT_TYPES[name]
    return False


def _sv_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "Undecodable: %r" % (data,)


class SvEvent:
    __slots__ = ("name", "payload", "serial", "pool_serials")

    def __init__(self, name: str, payload: str):
        self.name, self.payload = name, payload
        self.serial, self.pool_serials = None, {}


class _Listener:
    """One listener process as its pool sees it."""
    __slots__ = ("name", "write", "phase", "running", "buf", "resultlen", "result", "event")

    def __init__(self, name, write):
        self.name, self.write = name, write
        self.phase = "ACKNOWLEDGED"     # busy until it says READY
        self.running = False            # its process is RUNNING (startsecs passed)
        self.buf, self.resultlen, self.result, self.event = b"", None, b"", None


class ListenerPool:
    """One [eventlistener:x]: its event buffer and the protocol with each process.

    No process work here: ``add(key, name, write)`` gives a listener a ``write(bytes)``,
    ``feed(key, data)`` hands over what it printed. Usable on its own (the tests do).
    """

    def __init__(self, name, events, buffer_size=10, server="supervisor"):
        self.name, self.events, self.buffer_size, self.server = name, set(events), buffer_size, server
        self.buffer: list = []
        self.serial = -1
        self.listeners: dict = {}

    def wants(self, event_name: str) -> bool:
        return any(sv_event_is(event_name, e) for e in self.events)

    def accept(self, event: SvEvent, head=False) -> None:
        """Buffer an event (a full buffer drops its oldest, as supervisord does)."""
        if self.name not in event.pool_serials:
            self.serial += 1
            event.pool_serials[self.name] = self.serial
        if len(self.buffer) >= self.buffer_size and self.buffer:
            lost = self.buffer.pop(0)
            _log().error("pool %s event buffer overflowed, discarding event %s", self.name, lost.serial)
        self.buffer.insert(0, event) if head else self.buffer.append(event)

    def add(self, key, name, write) -> None:
        self.listeners[key] = _Listener(name, write)

    def running(self, key) -> None:
        if key in self.listeners:
            self.listeners[key].running = True
            self.dispatch()

    def remove(self, key) -> None:
        """A listener process ended: the event it held goes out again (first)."""
        listener = self.listeners.pop(key, None)
        if listener is not None and listener.event is not None:
            self.accept(listener.event, head=True)
            self.dispatch()

    def dispatch(self) -> None:
        """Send the oldest buffered events to READY listeners, one each."""
        while self.buffer:
            event = self.buffer[0]
            for listener in self.listeners.values():
                if listener.running and listener.phase == "READY" and self._send(listener, event):
                    break
            else:
                return
            self.buffer.pop(0)

    def _send(self, listener, event) -> bool:
        head = ("ver:3.0 server:%s serial:%s pool:%s poolserial:%s eventname:%s len:%d\n"
                % (self.server, event.serial, self.name, event.pool_serials[self.name], event.name,
                   len(event.payload)))
        try:
            listener.write((head + event.payload).encode("utf-8"))
        except OSError:         # its stdin is gone: it is exiting, the next one gets it
            return False
        listener.phase, listener.event = "BUSY", event
        return True

    def feed(self, key, data: bytes) -> None:
        """What a listener printed on its stdout: READY, RESULT n\\n + n bytes."""
        listener = self.listeners.get(key)
        if listener is None:
            return
        listener.buf += data
        self._advance(listener)
        self.dispatch()

    def _advance(self, l) -> None:
        while l.buf:
            if l.phase == "UNKNOWN":
                l.buf = b""
            elif l.phase == "ACKNOWLEDGED":
                if len(l.buf) < 6:
                    return
                ok = l.buf.startswith(b"READY\n")
                l.buf = l.buf[6:] if ok else b""
                self._enter(l, "READY" if ok else "UNKNOWN")
            elif l.phase == "READY":        # it spoke out of turn
                l.buf = b""
                self._enter(l, "UNKNOWN")
            elif not self._result(l):
                return

    def _result(self, l) -> bool:
        """BUSY: read ``RESULT n`` and n bytes; False while more is needed."""
        if l.resultlen is None:
            pos = l.buf.find(b"\n")
            if pos < 0:
                return False
            line, l.buf = l.buf[:pos], l.buf[pos + 1:]
            try:
                l.resultlen = int(line[7:])
            except ValueError:
                _log().warning("%s: bad result line: '%s'", l.name, _sv_text(line))
                l.buf = b""
                self._enter(l, "UNKNOWN")
                self._rejected(l)
                return False
        need = l.resultlen - len(l.result)
        l.result, l.buf = l.result + l.buf[:need], l.buf[need:]
        if len(l.result) < l.resultlen:
            return False
        result = l.result
        l.result, l.resultlen = b"", None
        self._enter(l, "ACKNOWLEDGED")
        if result == b"OK":
            l.event = None
        else:
            _log().warning("%s: event was rejected", l.name)
            self._rejected(l)
        return True

    def _rejected(self, l) -> None:
        if l.event is not None:
            self.accept(l.event, head=True)
            l.event = None

    def _enter(self, l, phase) -> None:
        """Its protocol phase: ACKNOWLEDGED, READY, BUSY or UNKNOWN (supervisord's names)."""
        l.phase = phase
        if phase == "UNKNOWN":
            _log().warning("%s: has entered the UNKNOWN state and will no longer receive events, "
                           "this usually indicates the process violated the eventlistener protocol",
                           l.name)


class _PipeWriter:
    """A listener's stdin: non-blocking writes, the rest queued, so a stuck listener
    never blocks the daemon."""

    def __init__(self, loop, fd):
        self.loop, self.fd, self.pending = loop, fd, bytearray()
        os.set_blocking(fd, False)

    def __call__(self, data: bytes) -> None:
        if self.fd is None:
            raise BrokenPipeError("closed")
        self.pending += data
        self.flush()

    def flush(self) -> None:
        try:
            n = os.write(self.fd, self.pending) if self.pending else 0
        except BlockingIOError:
            n = 0
        except OSError:
            self.close()
            return
        del self.pending[:n]
        if self.pending:
            self.loop.add_writer(self.fd, self.flush)
        else:
            self.loop.remove_writer(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            self.loop.remove_writer(self.fd)
            os.close(self.fd)
            self.fd = None


class _Capture:
    """``<!--XSUPERVISOR:BEGIN-->...<!--XSUPERVISOR:END-->`` in one output stream."""

    def __init__(self, maxbytes):
        self.maxbytes, self.on, self.held, self.text = maxbytes, False, b"", b""

    def feed(self, data: bytes) -> list:
        """[("log", output) or ("comm", a completed message)], in order; output is all but
        the tokens, cut at them (supervisord sends a PROCESS_LOG event per piece)."""
        data, self.held = self.held + data, b""
        out = []
        while data:
            token = _SV_COMM_END if self.on else _SV_COMM_BEGIN
            before, found, data = data.partition(token)
            if not found:       # keep what may be the start of a token for next time
                keep = next((i for i in range(min(len(token) - 1, len(before)), 0, -1)
                             if token.startswith(before[-i:])), 0)
                before, self.held = (before[:-keep], before[-keep:]) if keep else (before, b"")
            if before:
                out.append(("log", before))
            if self.on:
                self.text = (self.text + before)[-self.maxbytes:]
            if found:
                if self.on:
                    out.append(("comm", self.text))
                    self.text = b""
                self.on = not self.on
        return out


class SvEventHub:
    """The arbiter's events as Supervisor's, handed to the [eventlistener:x] pools."""

    def __init__(self, arbiter):
        self.arb = arbiter
        self.pools: dict = {}           # pool name -> ListenerPool
        self.serial = -1
        self.last: dict = {}            # watcher name -> its Supervisor process state
        self.writers: dict = {}         # listener pid -> _PipeWriter
        self.captures: dict = {}        # (watcher name, channel) -> _Capture
        self.ticks: dict = {}
        self.tick_timer = None
        self.groups: list = []          # the group names announced ADDED

    # -- pools ---------------------------------------------------------------
    def _sync_pools(self) -> None:
        for w in self.arb.watchers:
            sv = w.conf.sv or {}
            if "pool" not in sv:
                continue
            pool = self.pools.setdefault(sv["pool"], ListenerPool(sv["pool"], sv["events"], sv["buffer_size"]))
            pool.events, pool.buffer_size = set(sv["events"]), sv["buffer_size"]     # a reload may change them
        now = time.time()
        self.ticks = {n: self.ticks.get(n, int(now - now % n)) for n in _SV_TICKS}
        self._arm_tick()

    def notify(self, name: str, payload: str) -> None:
        """Offer one event to every pool that subscribes to it."""
        pools = [p for p in self.pools.values() if p.wants(name)]
        if not pools:
            return
        event = SvEvent(name, payload)
        self.serial += 1
        event.serial = self.serial
        for pool in pools:
            pool.accept(event)
            pool.dispatch()

    # -- daemon ----------------------------------------------------------------
    def start(self) -> None:
        """Before the programs start: each group ADDED, then SUPERVISOR RUNNING."""
        self._sync_pools()
        self._groups_changed()
        self.notify("SUPERVISOR_STATE_CHANGE_RUNNING", "")

    def stopping(self) -> None:
        self.notify("SUPERVISOR_STATE_CHANGE_STOPPING", "")
        if self.tick_timer is not None:
            self.tick_timer.cancel()
            self.tick_timer = None

    def _arm_tick(self) -> None:
        """Ticks only while some pool wants them: an idle daemon otherwise never wakes."""
        if self.tick_timer is not None or self.arb.loop is None or \
                not any(p.wants("TICK_%d" % n) for p in self.pools.values() for n in _SV_TICKS):
            return
        now = time.time()
        self.tick_timer = self.arb.loop.call_later(5 - now % 5 + 0.01, self._tick)

    def _tick(self) -> None:
        self.tick_timer = None
        now = time.time()
        for n in _SV_TICKS:
            when = int(now - now % n)
            if self.ticks.get(n) != when:
                self.ticks[n] = when
                self.notify("TICK_%d" % n, "when:%d" % when)
        self._arm_tick()

    # -- arbiter events --------------------------------------------------------
    def __call__(self, topic: str, payload: dict) -> None:
        if topic == "remote_communication":
            self.notify("REMOTE_COMMUNICATION", "type:%s\n%s" % (payload.get("type"), payload.get("data")))
            return
        parts = topic.split(".")
        if parts[0] != "watcher" or len(parts) < 3:
            return
        event = parts[-1]
        if event in ("add", "remove"):
            self._sync_pools()
            self._groups_changed()
            names = {w.name for w in self.arb.watchers}     # one added again starts from STOPPED
            self.last = {n: v for n, v in self.last.items() if n in names}
            return
        w = self._watcher(".".join(parts[1:-1])) if self.pools else None
        if w is not None:
            self._listener_event(w, event, payload)
            self._process_state(w, event, payload)

    def _watcher(self, topic_name):
        return next((w for w in self.arb.watchers if w.topic_name == topic_name), None)

    def _groups_changed(self) -> None:
        """PROCESS_GROUP_ADDED / _REMOVED for the groups that came or went."""
        now = list(dict.fromkeys(_sv_names(w)[1] for w in self.arb.iter_watchers()))
        for group in now:
            if group not in self.groups:
                self.notify("PROCESS_GROUP_ADDED", "groupname:%s\n" % group)
        for group in self.groups:
            if group not in now:
                self.notify("PROCESS_GROUP_REMOVED", "groupname:%s\n" % group)
        self.groups = now

    def _listener_event(self, w, event, payload) -> None:
        pool = self.pools.get((w.conf.sv or {}).get("pool"))
        pid = payload.get("process_pid")
        if pool is None or pid is None:
            return
        if event == "spawn":
            p = w.processes.get(pid)
            fd = getattr(p, "stdin_pipe", None)
            if fd is not None:
                self.writers[pid] = _PipeWriter(self.arb.loop, fd)
                p.stdin_pipe = None
                pool.add(pid, _sv_names(w)[0], self.writers[pid])
            if payload.get("state") == ProcState.RUNNING:
                pool.running(pid)
        elif event == "state" and payload.get("state") == ProcState.RUNNING:
            pool.running(pid)
        elif event == "reap":
            writer = self.writers.pop(pid, None)
            if writer is not None:
                writer.close()
            pool.remove(pid)

    def _process_state(self, w, event, payload) -> None:
        """PROCESS_STATE_* from the watcher's events, each move once, as supervisord sends it."""
        state = payload.get("state")
        if event == "spawn_failed":         # counted already: this start was try n - 1
            tries = payload.get("failures", 1)
            self._move(w, ProcState.STARTING, None, payload, tries - 1)
            self._move(w, ProcState.BACKOFF, None, payload, tries)
        elif event in ("spawn", "state", "reap") and state is not None:
            self._move(w, state, payload.get("process_pid"), payload)
        elif event == "stop" and state in _SV_PROCESS_STATES:
            self._move(w, state, None, payload)

    def _move(self, w, to, pid, payload, tries=None) -> None:
        frm, old_pid = self.last.get(w.name, (ProcState.STOPPED, 0))
        if to == frm:
            return
        self.last[w.name] = (to, pid or 0)
        pname, group = _sv_names(w)
        fields = [("processname", pname), ("groupname", group), ("from_state", frm)]
        failures = w.policy.failures
        if to == ProcState.STARTING:
            fields.append(("tries", failures if tries is None else tries))
        elif to == ProcState.BACKOFF:      # a reap comes before the policy counts it
            fields.append(("tries", failures + 1 if tries is None else tries))
        elif to == ProcState.EXITED:
            expected = payload.get("exit_code") in w.conf.options["exitcodes"]
            fields += [("expected", int(expected)), ("pid", pid or old_pid)]
        elif to in (ProcState.RUNNING, ProcState.STOPPING, ProcState.STOPPED):
            fields.append(("pid", pid or 0))
        self.notify("PROCESS_STATE_" + to, " ".join("%s:%s" % f for f in fields))

    # -- output ----------------------------------------------------------------
    def output(self, w, chunk) -> None:
        """A listener's stdout is its protocol; a program's may make LOG/COMMUNICATION events."""
        sv, channel, data = w.conf.sv or {}, chunk["name"], chunk["data"]
        if "pool" in sv:
            if channel == "stdout" and sv["pool"] in self.pools:
                self.pools[sv["pool"]].feed(chunk["pid"], data)
            return
        if not sv:
            return
        head = "processname:%s groupname:%s pid:%s" % (_sv_names(w) + (chunk["pid"],))
        cap = sv.get(channel + "_capture")
        pieces = self.captures.setdefault((w.name, channel), _Capture(cap)).feed(data) if cap \
            else [("log", data)]
        for kind, text in pieces:
            if kind == "comm":
                self.notify("PROCESS_COMMUNICATION_" + channel.upper(), "%s\n%s" % (head, _sv_text(text)))
            elif sv.get(channel + "_events"):
                self.notify("PROCESS_LOG_" + channel.upper(), "%s channel:%s\n%s" % (head, channel, _sv_text(text)))


def _sv_names(w):
    """(process name, group name) as Supervisor calls them, of a watcher or a WatcherConfig."""
    group = getattr(w, "conf", w).group or w.name
    return (w.name[len(group) + 1:] if w.name.startswith(group + ":") else w.name), group


# ---------------------------------------------------------------------------
# 12. Command table
# ---------------------------------------------------------------------------
# One entry per command holds every fact about it: the server side (runs in the daemon:
# returns a dict, or a coroutine for work that `waiting` may wait for; None: ctl's own), the
# ctl usage (also the argument parser), the text formatters, what an endpoint_owner and a
# dashboard GET may run. The controller, `ctl`, `ctl help` and the dashboard read this table.
# It is built at import with no asyncio or psutil, so that `ctl` starts fast.

#: Who besides root (and the daemon's user) may run a command when endpoint_owner is set.
ANYONE, OWN, ROOT = "anyone", "own", "root"     # OWN: on watchers running as the endpoint_owner


def _fmt_ok(reply):
    return "ok"


def _fmt_error(reply):
    return "error: %s" % reply.get("reason")


def _exit_ok(reply):
    return 0


class Command:
    """A command's facts:

    - ``run``: the daemon's side (None: ctl answers it itself); ``usage``: ctl's words, also
      ctl's parser; ``fmt``: the reply as text; ``help``: the docstring;
    - ``read_only``: it changes nothing, so a dashboard GET may run it;
    - ``peer``: ANYONE, OWN or ROOT (default: ANYONE when read_only, else ROOT);
    - ``argcount``, ``extra_ignored``: circusctl's words for a wrong count of arguments, and
      whether it drops extra words; ``fmt_error``: how it prints an error reply;
    - ``exit_code``: ctl's exit code for an ok reply; ``settable``: the keys ctl's `set` sends;
    - ``client``: what ctl runs instead of one request and its reply (see ``ctl_runner``).
    """
    __slots__ = ("name", "run", "usage", "fmt", "help", "read_only", "peer", "argcount",
                 "extra_ignored", "fmt_error", "exit_code", "settable", "client")

    def __init__(self, name, run, usage, fmt, help, read_only=False, peer=None, extra_ignored=False,
                 argcount="Invalid number of arguments", fmt_error=_fmt_error, exit_code=_exit_ok,
                 settable=frozenset()):
        self.name, self.run, self.usage, self.fmt, self.help = name, run, usage, fmt, help
        self.read_only, self.extra_ignored, self.argcount = read_only, extra_ignored, argcount
        self.peer = peer or (ANYONE if read_only else ROOT)
        self.fmt_error, self.exit_code, self.settable = fmt_error, exit_code, settable
        self.client = None


COMMANDS: dict = {}


def command(name, usage="", fmt=_fmt_ok, daemon=True, **facts):
    """Register a command; the docstring's first line is its short help. ``daemon=False``:
    ctl answers it itself (the daemon calls it unknown). ``facts``: see Command."""
    def deco(func):
        COMMANDS[name] = Command(name, func if daemon else None, usage, fmt,
                                 (func.__doc__ or "").strip(), **facts)
        return func
    return deco


# -- validation helpers ----------------------------------------------------------

def _prop(props, key, kind=None, default=None, required=False):
    if key not in props or props[key] is None:
        if required:
            raise MessageError("message invalid %r is missing" % key)
        return default
    try:
        return convert_value(kind, props[key])
    except ValueError as e:
        raise MessageError("%s: %s" % (key, e)) from None


def _watcher(arb, props):
    return arb.get_watcher(_prop(props, "name", str, required=True))


def _waiting(props) -> bool:
    """Does the client wait for the work to finish (``waiting``), as circusctl sends it?"""
    return props.get("waiting") is True or props.get("waiting") in ("true", "True", 1)


#: What `add`/`set` take besides WATCHER_OPTIONS (retry_in: circusctl sends it, circusd keeps it).
_OPTION_OBJECTS = ("env", "hooks", "rlimits", "stdout_stream", "stderr_stream", "retry_in")
_OPTION_PREFIXES = ("stdout_stream.", "stderr_stream.", "hooks.", "rlimit_")
#: Fixed when a watcher is made: `add` and `set` refuse them (Circus's rule).
_FIXED_KEYS = ("priority", "use_sockets", "on_demand", "autostart", "environment_file", "depends_on",
               "oneshot")


def _check_option_name(key, w=None) -> None:
    """An option nothing reads is refused, as circusd does (errno 3 ``unknown key``); a
    free-form key is taken when the watcher has it already (from its config)."""
    if key in WATCHER_OPTIONS or key in _OPTION_OBJECTS or key.startswith(_OPTION_PREFIXES):
        return
    if (key.startswith("flapping.") and key[9:] in Flapping.KEYS) or (w is not None and key in w.conf.free):
        return
    raise MessageError("unknown key %r" % key)


# -- who may do what: root and the daemon's user everything, endpoint_owner its own watchers --

#: Options an endpoint_owner may give to `add` and `set` on its own watchers. Everything
#: else (executable, working_dir, copy_env, copy_path, virtualenv, stdin_socket, hooks,
#: streams, rlimits...) is acted on by the root daemon itself, so only root may change it.
OWNER_KEYS = frozenset((
    "cmd", "args", "numprocesses", "warmup_delay", "shell", "shell_args", "uid", "gid", "env",
    "send_hup", "stop_signal", "stop_children", "max_retry", "backoff_max", "graceful_timeout", "singleton",
    "respawn", "max_age", "max_age_variance", "close_child_stdin", "close_child_stdout",
    "close_child_stderr", "check_flapping", "flapping_attempts", "flapping_window", "retry_in",
    "parent_death_signal", "ready", "ready_timeout", "startsecs", "autorestart", "exitcodes",
    "stopasgroup", "killasgroup", "redirect_stderr", "umask", "max_rss", "max_cpu",
    "watchdog_interval", "watchdog_grace", "watchdog_signal",
    # an exec: check runs as the watcher's user; health_action = exit would end every watcher
    "health_check", "health_interval", "health_timeout", "health_failures"))

class Peer:
    """A user other than root and the daemon's own who sent a request (the endpoint_owner)."""

    def __init__(self, uid: int, gid: int):
        import pwd
        self.uid, self.gid = uid, gid
        self.groups = {gid}
        try:
            self.groups.update(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
        except (KeyError, OSError, OverflowError):
            pass

    def refuse(self, what: str):
        return CommandError("refused: %s (endpoint_owner, uid %d, may only manage watchers running "
                            "as itself; see README, Security)" % (what, self.uid))


def _runs_as_peer(w, peer) -> bool:
    o = w.conf.options
    try:
        uid, gid, _ = resolve_user(o["uid"], o["gid"])
    except ValueError:
        return False
    uid = os.geteuid() if uid is None else uid
    gid = os.getegid() if gid is None else gid
    return uid == peer.uid and gid in peer.groups


def _conf_value(conf, key):
    """What a WatcherConfig holds for one `set` key (None when unset)."""
    if key in conf.options:
        return conf.options[key]
    for which in ("stdout_stream", "stderr_stream"):
        if key.startswith(which + "."):
            return getattr(conf, which).get(key[len(which) + 1:])
    if key.startswith("hooks."):
        return conf.hooks.get(key[6:])
    if key.startswith("rlimit_"):
        return conf.rlimits.get(key[7:].lower())
    return conf.free.get(key)


def _check_owner_key(peer, key, value, current=None):
    """Raise unless a restricted peer may give ``key = value`` (current: the watcher's conf)."""
    if key == "uid" or key == "gid":
        try:
            uid, gid, _ = resolve_user(value, None) if key == "uid" else resolve_user(None, value)
        except ValueError as e:
            raise MessageError("%s: %s" % (key, e)) from None
        if (uid if key == "uid" else gid) not in ((peer.uid,) if key == "uid" else peer.groups):
            raise peer.refuse("%s = %s is not yours" % (key, value))
        return
    # a cmd naming $(circus.sockets.X) is handed that root-bound socket: the config's choice
    if key in OWNER_KEYS and not (key in ("cmd", "args") and "sockets." in str(value).lower()):
        return
    if current is not None and key not in ("hooks", "rlimits", "stdout_stream", "stderr_stream"):
        probe = WatcherConfig(current.name)     # the same value the config gave is no change
        try:
            probe.set(key, value)
        except ValueError as e:
            raise MessageError("%s: %s" % (key, e)) from None
        if _conf_value(probe, key) == _conf_value(current, key):
            return
    raise peer.refuse("only root may set %r" % key)


def check_peer(arb, peer, name: str, props: dict) -> None:
    """Raise CommandError unless ``peer`` may run command ``name`` with ``props``."""
    access = ANYONE if peer is None else COMMANDS[name].peer
    if access == ANYONE:
        return
    if access == ROOT:
        raise peer.refuse("%r is for root only" % name)
    if name == "add":
        _check_peer_add(peer, props)
        return
    targets = _peer_targets(arb, peer, name, props)
    if name == "set" and isinstance(props.get("options"), dict):
        for key, value in props["options"].items():
            _check_option_name(key, targets[0])
            _check_owner_key(peer, key, value, targets[0].conf)


def _check_peer_add(peer, props) -> None:
    """An endpoint_owner adds watchers that run as itself, with the options it may give."""
    options = props.get("options") if isinstance(props.get("options"), dict) else {}
    if options.get("uid") is None:
        raise peer.refuse("add needs uid = %d (without it the watcher would run as root)" % peer.uid)
    given = dict(options, **{k: props[k] for k in ("cmd", "args") if props.get(k) is not None})
    for key, value in given.items():
        _check_option_name(key)         # a typo is a typo, as for root, not a refusal
        _check_owner_key(peer, key, value)


def _peer_targets(arb, peer, name, props) -> list:
    """The watchers a command names, each checked to run as ``peer`` (never `all`)."""
    wanted = props.get("name")
    fan_out = name in ("start", "stop", "restart")
    if not wanted or (fan_out and str(wanted).lower() == "all"
                      and not any(w.name.lower() == "all" for w in arb.watchers)):
        raise peer.refuse("%r needs the name of one of its watchers" % name)
    targets = _match(arb, props) if fan_out else [_watcher(arb, props)]
    for w in targets:
        if not _runs_as_peer(w, peer):
            raise peer.refuse("watcher %r does not run as uid %d" % (w.name, peer.uid))
    return targets


def _match(arb, props):
    """Watchers named by ``name`` under ``match``: simple, glob (default) or regex."""
    name = str(_prop(props, "name", str)).lower()
    how = props.get("match") or "glob"
    matches = _name_test(how, name)
    found = [w for w in arb.watchers if matches(w.name.lower())]
    if not found and how != "regex" and not any(c in name for c in "*?["):
        # Supervisor's names: a group by its name, `group:` or `group:*`
        group = name[:-1] if name.endswith(":") else name
        found = [w for w in arb.watchers if w.name.lower().startswith(group + ":")]
    if not found:
        raise MessageError("program %s not found" % props.get("name"))
    return found


def _name_test(how, name):
    """The test of a lower-cased watcher name for one ``match`` method."""
    import fnmatch
    if how == "simple":
        return lambda n: n == name
    if how == "glob":
        return lambda n: fnmatch.fnmatch(n, name)
    if how != "regex":
        raise MessageError("unknown match method %s" % how)
    try:
        return re.compile(name).match
    except re.error as e:
        raise MessageError("invalid regex %r: %s" % (name, e)) from None


def _one_or_many(arb, props, one, many, nameless):
    """The all/one-watcher fan-out shared by start, stop and restart."""
    if not props.get("name"):
        return nameless()
    if str(props["name"]).lower() == "all" and not any(w.name.lower() == "all" for w in arb.watchers):
        return many(list(arb.watchers))     # supervisorctl's `all`
    found = _match(arb, props)
    if len(found) == 1:
        return one(found[0])
    return many(found)


# -- watcher lifecycle -------------------------------------------------------------

async def _until_running(props, ws) -> None:
    """With --waiting, as supervisorctl: answer once the new processes are RUNNING."""
    if _prop(props, "waiting", bool, False):
        for w in ws:
            await w.until_running()


@command("start", "[name] [--waiting] [--match=glob]", peer=OWN)
def cmd_start(arb, props):
    """Start the arbiter or a watcher (even one with autostart = false)."""
    async def one(w):
        info = await arb.start_watcher(w)       # what it depends on first
        await _until_running(props, [w])
        return {"info": {"started": info["started"], "kept": info["kept"]}}

    async def many(ws):
        await arb.start_watchers(ws)
        await _until_running(props, ws)
        return {}
    return _one_or_many(arb, props, one, many, lambda: _none(arb.start_watchers()))


def _fmt_stop(reply):
    first = reply.get("dependants")
    return "stopped first, as they depend on it: %s\nok" % ", ".join(first) if first else "ok"


@command("stop", "[name] [--waiting] [--match=glob]", _fmt_stop, peer=OWN)
def cmd_stop(arb, props):
    """Stop the arbiter's watchers or one of them (processes get stop_signal, then SIGKILL);
    what depends on them (depends_on) stops first."""
    def one(w):
        first = arb.dependants_up([w])

        async def run():
            if first:
                await arb.stop_watchers(first)
            await _locked(w, w.stop)
            return {"info": None}
        return _naming(arb, props, run(), first)

    def many(ws):
        first = arb.dependants_up(ws)
        return _naming(arb, props, _none(arb.stop_watchers(ws + first)), first)
    return _one_or_many(arb, props, one, many, lambda: _none(arb.stop_watchers()))


def _naming(arb, props, coro, dependants):
    """The reply names the ``dependants`` a stop stops first, with or without --waiting."""
    if not dependants:
        return coro
    names = {"dependants": [x.name for x in dependants]}
    if not _waiting(props):
        asyncio.get_running_loop().create_task(arb._guarded(coro))
        return names

    async def run():
        return dict(await coro, **names)
    return run()


@command("restart", "[name] [--waiting] [--match=glob]", peer=OWN)
def cmd_restart(arb, props):
    """Restart a watcher, or without a name the whole arbiter (re-reading the config)."""
    async def one(w):
        info = await _locked(w, w.restart)
        await _until_running(props, [w])
        return {"info": info}

    async def many(ws):
        await arb.stop_watchers(ws)
        await arb.start_watchers(ws)
        await _until_running(props, ws)
        return {}
    return _one_or_many(arb, props, one, many, lambda: _none(arb.restart()))


@command("reload", "[name] [--terminate] [--waiting] [--sequential]", peer=OWN)
def cmd_reload(arb, props):
    """Reload processes gracefully: new ones first, then the old ones stop."""
    graceful = _prop(props, "graceful", bool, True)
    sequential = _prop(props, "sequential", bool, False)
    if props.get("name"):
        w = _watcher(arb, props)

        async def one():
            return {"info": await _locked(w, lambda: w.reload(graceful, sequential))}
        return one()
    return _none(arb.reload(graceful, sequential))


@command("reloadconfig", "[--waiting]")
def cmd_reloadconfig(arb, props):
    """Re-read the config file and apply only what changed (a broken file changes nothing)."""
    new = arb._load_new_config()        # a broken file is the reply, with or without --waiting
    return _none(arb.reload_config(new))


def _fmt_numprocesses(reply):
    if reply.get("singleton"):
        return "This watcher is a Singleton - not changing the number of processes"
    return str(reply["numprocesses"]) if "numprocesses" in reply else "ok"


def _resize(arb, props, sign):
    w = _watcher(arb, props)
    nb = _prop(props, "nb", int, 1)
    if w.conf.options["singleton"]:
        return {"numprocesses": w.numprocesses, "singleton": True}

    def target():
        # the result is checked, whatever the signs (`decr w -50` is an increase)
        n = w.numprocesses + sign * nb
        if arb.max_processes is not None and n > arb.max_processes:
            raise MessageError("numprocesses %d is above max_processes (%d)" % (n, arb.max_processes))
        return n
    target()                # refused in the reply; checked again in turn (a queued incr)

    async def run():
        n = await _locked(w, lambda: w.set_numprocesses(target()))
        return {"numprocesses": n}
    return run()


@command("incr", "name [nb] [--waiting]", _fmt_numprocesses, peer=OWN)
def cmd_incr(arb, props):
    """Add nb processes (default 1) to a watcher."""
    return _resize(arb, props, 1)


@command("decr", "name [nb] [--waiting]", _fmt_numprocesses, peer=OWN)
def cmd_decr(arb, props):
    """Remove nb processes (default 1) from a watcher; the oldest go first."""
    return _resize(arb, props, -1)


@command("signal", "name [pid] signum [--children] [--recursive]", peer=OWN)
def cmd_signal(arb, props):
    """Send a signal to a watcher's processes, one process, or their children."""
    w = _watcher(arb, props)
    signum = _prop(props, "signum", "signal", required=True)
    pid = _prop(props, "pid", int)
    childpid = _prop(props, "childpid", int)
    w.send_signal(signum, pid=pid, childpid=childpid, children=_prop(props, "children", bool, False),
                  recursive=_prop(props, "recursive", bool, False))
    return {}


@command("kill", "name [pid] [--signum=] [--graceful_timeout=] [--waiting]", peer=OWN)
def cmd_kill(arb, props):
    """Stop processes (signal, then SIGKILL after graceful_timeout); they are respawned."""
    w = _watcher(arb, props)
    pid = _prop(props, "pid", int)
    signum = _prop(props, "signum", "signal")
    timeout = _prop(props, "graceful_timeout", float)
    if pid is not None and pid not in w.processes:
        raise MessageError("process %s not found in %r" % (pid, w.name))
    return _none(w.kill(signum, pid, timeout))


# -- watchers at runtime -------------------------------------------------------------

def _add_options(options) -> dict:
    """`add`'s options checked, with rlimit_X keys gathered into rlimits."""
    if not isinstance(options, dict):
        raise MessageError("'options' property should be an object")
    for key in options:
        _check_option_name(key)
        if key in _FIXED_KEYS:
            raise MessageError("%r cannot be set by add (Circus's rule); put it in the config file" % key)
    opts = {k: v for k, v in options.items() if not k.startswith("rlimit_")}
    rl = {k[7:]: v for k, v in options.items() if k.startswith("rlimit_")}
    if rl:
        opts["rlimits"] = rl
    return opts


def _check_add_owner(endpoint_owner, opts) -> None:
    """Circus's rule: whoever owns the endpoint may only add watchers running as itself."""
    try:
        owner = resolve_user(endpoint_owner, None)[0]
        wanted = resolve_user(opts.get("uid"), None)[0] if opts.get("uid") is not None else None
    except ValueError:
        owner, wanted = -1, None
    if wanted is None or wanted != owner:
        raise MessageError("uid does not match endpoint_owner")


@command("add", "name cmd... [--start]", peer=OWN)      # as itself: see check_peer
def cmd_add(arb, props):
    """Add a watcher running CMD (started with --start)."""
    name = _prop(props, "name", str, required=True)
    cmd = _prop(props, "cmd", str, required=True)
    if not re.fullmatch(r"[\w.@:+-][\w .@:+-]*", name):     # fullmatch: `$` lets "x\n" in
        raise MessageError("invalid watcher name %r: use letters, digits and . _ - @ : +" % name)
    opts = _add_options(props.get("options") or {})
    args = props.get("args")
    if args is not None and not isinstance(args, (str, list)):
        raise MessageError("'args' should be a string or a list")
    if arb.endpoint_owner is not None:
        _check_add_owner(arb.endpoint_owner, opts)
    limit = arb.max_processes
    if limit is not None and _prop(opts, "numprocesses", int, 1) > limit:
        raise MessageError("numprocesses %s is above max_processes (%d)" % (opts["numprocesses"], limit))
    opts.setdefault("warmup_delay", 0.0)
    start = _prop(props, "start", bool, False)

    async def start_it(w):
        if w not in arb.watchers:       # a reloadconfig or rm took it first
            raise CommandError("watcher %r was removed before it could start" % name)
        return await w.start()

    async def add():
        # In turn with reloadconfig (the arbiter's lock), so the name is checked against
        # what the reload made: never two watchers of one name. The reply waits for this.
        async with arb._lock:
            w = arb.add_watcher(name, cmd, args, opts)
            w.conf.added = True
            if start and _waiting(props):
                info = await _locked(w, lambda: start_it(w))
                return {"started": info["started"], "kept": info["kept"]}
        if start:
            arb.loop.create_task(arb._guarded(_locked(w, lambda: start_it(w))))
        return {}
    return _Await(add())


@command("rm", "name [--nostop] [--waiting]", _fmt_stop, peer=OWN)
def cmd_rm(arb, props):
    """Remove a watcher (its processes are stopped unless nostop); what depends on it
    (depends_on) stops first, as with `stop`."""
    w = _watcher(arb, props)
    nostop = _prop(props, "nostop", bool, False)
    first = [] if nostop else arb.dependants_up([w])
    gone = arb.rm_watcher(w, nostop)        # detached now; its stop runs once awaited
    if not first:
        return gone

    async def run():
        await arb.stop_watchers(first)
        return await gone
    return _naming(arb, props, run(), first)


def _circusctl_settable() -> frozenset:
    """The keys circusctl's `set` converts, so ctl refuses the others as it does: the
    WATCHER_OPTIONS that `options` shows but those fixed at start and two circusctl does
    not know, with env, hooks and retry_in (plus stdout_stream.*, stderr_stream.*, rlimit_*)."""
    skip = _FIXED_KEYS + ("shell_args", "executable")
    return frozenset([k for k in VISIBLE_OPTIONS if k in WATCHER_OPTIONS and k not in skip]
                     + ["env", "hooks", "retry_in"])


@command("set", "name options... [--waiting]", peer=OWN, settable=_circusctl_settable())
def cmd_set(arb, props):
    """Set watcher options: ctl set NAME KEY VALUE [KEY VALUE ...]."""
    w = _watcher(arb, props)
    options = props.get("options")
    if not isinstance(options, dict) or not options:
        raise MessageError("'options' property should be an object")
    import copy
    probe = copy.deepcopy(w.conf)       # the watcher as it would be: each value and their mix
    for key, value in options.items():
        _check_option_name(key, w)
        if key == "env" and isinstance(value, str):
            options[key] = convert_value("env", value)
        try:
            probe.set(key, options[key])
        except ValueError as e:
            raise MessageError("%s: %s" % (key, e)) from None
        if key in _FIXED_KEYS:
            raise MessageError("%r cannot be changed at run time; edit the config and reloadconfig" % key)
        if key == "numprocesses" and arb.max_processes is not None and to_int(options[key]) > arb.max_processes:
            raise MessageError("numprocesses %s is above max_processes (%d)" % (options[key], arb.max_processes))
    try:
        probe.check()
        for which in ("stdout_stream", "stderr_stream"):
            if any(k.startswith(which) for k in options):
                w.output.check(getattr(probe, which))      # as add does: class, log folder
        Flapping.from_settings(arb.flapping_plugin, probe.free)
    except ValueError as e:
        raise MessageError(str(e)) from None

    async def run():
        await _locked(w, lambda: w.set_options(options))
        w.flapping = Flapping.from_settings(arb.flapping_plugin, w.conf.free)
        arb._watch_resources(w)
        arb._schedule(w)
    return _none(run())


# -- read-only ---------------------------------------------------------------------

def _fmt_status(reply):
    if "processes" in reply:
        return _fmt_processes(reply["processes"])
    if "statuses" in reply:
        st = reply["statuses"]
        return "\n".join("%s: %s" % (k, st[k]) for k in sorted(st))
    if reply.get("next_run"):       # circus.py's own field: circusctl shows `status` alone
        return "%s; next %s: %s (%s)" % (reply.get("status"), "restart" if reply["schedule"] == "restart_cron"
                                         else "run", reply["next_run"][:16].replace("T", " "), reply["schedule"])
    return str(reply.get("status"))


def _next_run(arb, w) -> dict:
    """A scheduled watcher's next run (ISO local time) and which key set it."""
    sched = arb.schedules.get(w)
    if sched is None or sched.next_run() is None:
        return {}
    return {"next_run": sched.next_run(), "schedule": sched.kind}


def _status_exit_code(reply) -> int:
    """3 when some process is not running, as supervisorctl status exits."""
    stopped = (ProcState.STOPPED, ProcState.EXITED, ProcState.FATAL)
    return 3 if any(r["state"] in stopped for r in reply.get("processes", ())) else 0


@command("status", "[name] [--long]", _fmt_status, read_only=True, argcount="message invalid",
         fmt_error=lambda reply: "error", exit_code=_status_exit_code)
def cmd_status(arb, props):
    """Status of every watcher, or of one; --long: every process, as supervisorctl shows it."""
    long = _prop(props, "long", bool, False)
    if long and str(props.get("name", "")).lower() == "all":
        props = {}
    if props.get("name"):
        found = _match(arb, props) if long else [_watcher(arb, props)]
        if long:
            return {"status": "ok", "processes": [r for w in found for r in process_rows(w)]}
        return dict({"status": found[0].status}, **_next_run(arb, found[0]))
    if long:
        return {"processes": [r for w in arb.watchers for r in process_rows(w)]}
    return {"statuses": {w.name: w.status for w in arb.watchers}}


def _uptime(seconds) -> str:
    days, rest = divmod(int(seconds), 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    out = "%d:%02d:%02d" % (h, m, sec)
    return ("%d day%s, " % (days, "s" if days > 1 else "") + out) if days else out


def process_rows(w) -> list:
    """One row per process (or one for the watcher when none runs), Supervisor's way."""
    now = time.time()
    procs = sorted(list(w.processes.values()) + [p for p in w.retiring.values() if p.alive],
                   key=lambda p: p.wid)
    if not procs:
        return [_row(w, w.name, w.sv_state, None, None, _idle_description(w))]
    rows = []
    for p in procs:
        name = w.name if w.numprocesses <= 1 and len(procs) == 1 else "%s:%d" % (w.name, p.wid)
        desc = "pid %d, uptime %s" % (p.pid, _uptime(now - p.started)) if p.state == ProcState.RUNNING else ""
        if desc and w.health is not None and w.health.describe(p.pid):
            desc += ", " + w.health.describe(p.pid)
        rows.append(_row(w, name, p.state, p.pid, now - p.started, desc))
    missing = w.numprocesses - len(w.processes)
    if procs and missing > 0 and w.sv_state == ProcState.BACKOFF and w.state == ProcState.RUNNING:
        used = {p.wid for p in procs}       # the processes a failing spawn still owes
        wids = [i for i in range(1, w.numprocesses + len(used) + 1) if i not in used][:missing]
        rows += [_row(w, "%s:%d" % (w.name, i), w.sv_state, None, None, w.last_error or "")
                 for i in wids]
    return rows


def _row(w, name, state, pid, uptime, description) -> dict:
    return {"name": name, "watcher": w.name, "state": state, "pid": pid, "uptime": uptime,
            "description": description, "restarts": w.restarts}


def _idle_description(w) -> str:
    """What a watcher with no process shows: why it failed, or since when it is stopped."""
    if w.state == ProcState.WAITING:
        return w.waiting_for()
    if w.sv_state in (ProcState.BACKOFF, ProcState.FATAL):
        return w.last_error or 'unknown error (try "tail %s")' % w.name
    if w.sv_state in (ProcState.STOPPED, ProcState.EXITED):
        return time.strftime("%b %d %I:%M %p", time.localtime(w.sv_since)) if w.sv_since else "Not started"
    return ""


def _fmt_processes(rows) -> str:
    width = max([30] + [len(r["name"]) for r in rows]) + 3
    return "\n".join(("%-*s%-10s%s" % (width, r["name"], r["state"], r["description"])).rstrip()
                     for r in sorted(rows, key=lambda r: r["name"]))


def _fmt_list(reply):
    if "pids" in reply:
        return ",".join(str(p) for p in reply["pids"])
    return ",".join(reply.get("watchers", []))


@command("list", "[name]", _fmt_list, read_only=True)
def cmd_list(arb, props):
    """Watcher names, or the pids of one watcher in spawn order."""
    if props.get("name"):
        w = _watcher(arb, props)
        reply = {"pids": sorted(w.processes, key=lambda pid: w.processes[pid].started)}
        ws = [w]
    else:
        reply, ws = {"watchers": sorted(w.name.lower() for w in arb.watchers)}, arb.watchers
    waiting = sorted(w.name.lower() for w in ws if w.state == ProcState.WAITING)
    if waiting:     # depends_on: no pid yet, and why
        reply["waiting"] = waiting
    return reply


def _fmt_field(key):
    return lambda reply: str(reply.get(key))


@command("numprocesses", "[name]", _fmt_field("numprocesses"), read_only=True, argcount="message invalid")
def cmd_numprocesses(arb, props):
    """Number of processes of one watcher, or of all."""
    if props.get("name"):
        w = _watcher(arb, props)
        return {"numprocesses": len(w.processes), "watcher_name": props["name"]}
    return {"numprocesses": sum(len(w.processes) for w in arb.watchers)}


@command("numwatchers", "", _fmt_field("numwatchers"), read_only=True)
def cmd_numwatchers(arb, props):
    """Number of watchers."""
    return {"numwatchers": len(arb.watchers)}


def readiness(arb, watchers) -> list:
    """What is not ready among ``watchers``, and why: [{"watcher": NAME or None (the daemon
    itself), "reason": TEXT}]. The one judgement `ready`, /readyz and HEALTHCHECKs share."""
    waiting = []
    if arb.stopping:
        waiting.append({"watcher": None, "reason": "the daemon is shutting down"})
    for w in watchers:
        if arb.booting and w.state == ProcState.STOPPED and w.conf.starts_at_boot and not w.on_demand_fds:
            why = "not started yet (the daemon is starting)"
        else:
            why = w.not_ready_reason()
        if why:
            waiting.append({"watcher": w.name, "reason": why})
    return waiting


def _fmt_ready(reply):
    return "\n".join("%s: %s" % (r["watcher"] or "daemon", r["reason"]) for r in reply["waiting"]) or "ready"


@command("ready", "[names...]", _fmt_ready, read_only=True,
         exit_code=lambda reply: 0 if reply.get("ready") else 1)
def cmd_ready(arb, props):
    """Are all watchers (or those named) that should run up and ready? exit 1 with the reasons if not."""
    names = props.get("names") or []
    names = [names] if isinstance(names, str) else names     # (one name, as GET /api/ready?names=x)
    if not isinstance(names, list):
        raise MessageError("names: a list of watcher names is expected")
    waiting = readiness(arb, [arb.get_watcher(n) for n in names] if names else arb.watchers)
    return {"ready": not waiting, "waiting": waiting}


def _opt_str(key, value):
    if key == "env" and isinstance(value, dict):
        return ",".join("%s=%s" % (k, value[k]) for k in sorted(value))
    return "" if value is None else str(value)


def _fmt_options(reply):
    return "\n".join("%s: %s" % (k, _opt_str(k, v)) for k, v in reply.get("options", {}).items())


@command("options", "name", _fmt_options, read_only=True, peer=OWN, extra_ignored=True,
         argcount="number of arguments invalid")
def cmd_options(arb, props):
    """All options of a watcher."""
    return {"options": _watcher(arb, props).options()}


@command("get", "name keys+", _fmt_options, read_only=True, peer=OWN)
def cmd_get(arb, props):
    """Values of some watcher options."""
    w = _watcher(arb, props)
    keys = _prop(props, "keys", required=True)
    if not isinstance(keys, list):
        raise MessageError("'keys' should be a list of option names")
    opts = w.options()
    out = {}
    for k in keys:
        if k in opts:
            out[k] = opts[k]
        elif k in WATCHER_OPTIONS:      # circus.py's own keys (`set` takes them), not in circusd's list
            out[k] = w.conf.options[k]
        else:
            raise MessageError("%r option not found" % k)
    return {"options": out}


@command("globaloptions", "[option]", _fmt_options, read_only=True, extra_ignored=True,
         fmt_error=lambda reply: reply.get("reason"))
def cmd_globaloptions(arb, props):
    """The arbiter's options (endpoints, check_delay)."""
    opts = {"endpoint": arb.endpoint, "stats_endpoint": arb.stats_endpoint,
            "pubsub_endpoint": arb.pubsub_endpoint, "check_delay": arb.check_delay,
            "multicast_endpoint": arb.multicast_endpoint or ""}
    if arb.metrics_endpoint:        # only when configured: Circus clients see Circus's keys
        ms = [c for c in arb.channels if getattr(c, "what", None) == "metrics endpoint"]   # MetricsServer
        opts["metrics_endpoint"] = "%s:%s" % (ms[0].host, ms[0].port) if ms else arb.metrics_endpoint
    key = props.get("option")
    if key:
        if key not in opts:
            raise MessageError("%r not an existing option" % key)
        return {"options": {key: opts[key]}}
    return {"options": opts}


def _fmt_sockets(reply):
    out = []
    for s in reply.get("sockets", []):
        where = s["path"] if "path" in s else "%s:%s" % (s.get("host"), s.get("port"))
        out.append("%s:socket '%s' at %s" % (s.get("fd"), s.get("name"), where))
    return "\n".join(out)


@command("listsockets", "", _fmt_sockets, read_only=True, extra_ignored=True)
def cmd_listsockets(arb, props):
    """The sockets the daemon holds, by fd."""
    return {"sockets": sorted((s.info() for s in arb.sockets.values()), key=lambda d: d["fd"])}


_INFOLINE = "%(pid)s  %(cmdline)s %(username)s %(nice)s %(mem_info1)s %(mem_info2)s %(cpu)s %(mem)s %(ctime)s"


def _info_line(info):
    if not isinstance(info, dict):
        return str(info)
    info = dict(info)
    kids = info.pop("children", [])
    lines = [_INFOLINE % _defaulted(info)]
    lines += ["   " + _INFOLINE % _defaulted(c) for c in kids]
    return "\n".join(lines)


def _defaulted(info):
    keys = ("pid", "cmdline", "username", "nice", "mem_info1", "mem_info2", "cpu", "mem", "ctime")
    return {k: info.get(k, "N/A") for k in keys}


def _fmt_stats(reply):
    if "infos" in reply:
        out = []
        for wname, procs in reply["infos"].items():
            out.append("%s:" % wname)
            out += ["%s: %s" % (pid, _info_line(i)) for pid, i in (procs or {}).items()]
        return "\n".join(out)
    if "name" in reply:
        return "\n".join(["%s:" % reply["name"]] +
                         ["%s: %s" % (pid, _info_line(i)) for pid, i in reply.get("info", {}).items()])
    return "%s: %s\n" % (reply.get("process"), _info_line(reply.get("info")))


class _Await:
    """A command result the reply always waits for (a read done off the loop)."""

    def __init__(self, awaitable):
        self.awaitable = awaitable


def _stats_off_loop(watchers, extended):
    """Run psutil in a worker thread so respawns and commands never wait for it.

    Returns {watcher: {pid: info}}; extended_stats hooks then run on the loop.
    """
    snapshot = [(w, [(pid, p.started, p.wid) for pid, p in w.processes.items()]) for w in watchers]

    def compute():
        kids_of = _children_map()
        out = []
        for w, procs in snapshot:
            infos = {}
            for pid, started, wid in procs:
                info = process_stats(pid, kids_of)
                if isinstance(info, dict):
                    info.update(started=started, wid=wid, age=time.time() - started)
                infos[pid] = info
            out.append((w, infos))
        keep = {pid for _, procs in snapshot for pid, _, _ in procs} | {os.getpid()}
        keep |= {c for pid in list(keep) for c in kids_of.get(pid, ())}
        if len(watchers) > 1 or len(_PS_CACHE) > 4 * len(keep) + 64:   # forget the dead
            for pid in list(_PS_CACHE):
                if pid not in keep:
                    _PS_CACHE.pop(pid, None)
        return out

    async def run():
        result = await asyncio.get_running_loop().run_in_executor(None, compute)
        for w, infos in result:
            for pid, info in infos.items():
                if isinstance(info, dict) and w.health is not None:
                    info.update(_health_fields(w, pid))
                if extended and isinstance(info, dict):
                    w.call_hook("extended_stats", pid=pid, stats=info)
        return {w: {str(pid): info for pid, info in infos.items()} for w, infos in result}
    return run()


@command("stats", "[name] [process] [--extended]", _fmt_stats, read_only=True, argcount="message invalid")
def cmd_stats(arb, props):
    """CPU, memory and age of the processes (all, one watcher, or one pid)."""
    extended = _prop(props, "extended", bool, False)
    if not props.get("name"):
        async def every():
            stats = await _stats_off_loop(arb.watchers, extended)
            return {"infos": {w.name: infos for w, infos in stats.items()}}
        return _Await(every())
    w = _watcher(arb, props)
    pid = _prop(props, "process", int)
    if pid is not None and pid not in w.processes:
        raise MessageError("process %s not found in %r" % (pid, w.name))

    async def one():
        infos = (await _stats_off_loop([w], extended))[w]
        if pid is not None:
            return {"process": pid, "info": infos[str(pid)]}
        return {"name": props["name"], "info": infos}
    return _Await(one())


def _fmt_dstats(reply):
    info = dict(reply.get("info") or {})
    kids = info.pop("children", [])
    out = ["Main Process:", "    " + _INFOLINE % _defaulted(info)]
    if kids:
        out.append("Children:")
        out += ["    " + _INFOLINE % _defaulted(c) for c in kids]
    return "\n".join(out)


@command("dstats", "", _fmt_dstats, read_only=True, extra_ignored=True)
def cmd_dstats(arb, props):
    """CPU and memory of the daemon itself."""
    info = process_stats(os.getpid())
    return {"info": info}


@command("snapshot", "", lambda reply: json.dumps({k: reply[k] for k in ("daemon", "watchers")}, indent=2),
         read_only=True)
def cmd_snapshot(arb, props):
    """Every watcher and process with its state, CPU and memory, in one reply (the dashboard's)."""
    return _Await(_usage_off_loop(snapshot_skeleton(arb), arb.snapshot_cache))


def _fmt_pids(reply):
    if "pids" in reply:
        return "\n".join(str(p) for p in reply["pids"])
    return str(reply.get("pid"))


@command("pid", "[name]", _fmt_pids, read_only=True)
def cmd_pid(arb, props):
    """The daemon's pid, or the pids of a watcher (or `all`), one per line."""
    name = props.get("name")
    if not name:
        return {"pid": os.getpid()}
    ws = arb.watchers if str(name).lower() == "all" else _match(arb, props)
    return {"pids": [pid for w in ws for pid in sorted(w.processes, key=lambda p: w.processes[p].wid)]}


def _fmt_tail(reply):
    return reply.get("data", "")


@command("tail", "name [stream] [--bytes=1600]", _fmt_tail, read_only=True, peer=OWN)
def cmd_tail(arb, props):
    """The last output of a watcher: ctl tail [-f] [-BYTES] NAME [stdout|stderr]."""
    w = _watcher(arb, props)
    stream = props.get("stream") or "stdout"
    if stream not in ("stdout", "stderr"):
        raise MessageError("stream must be stdout or stderr, not %r" % stream)
    n = _prop(props, "bytes", int, 1600)
    return {"name": w.name, "stream": stream,
            "data": w.tails[stream].tail(n).decode("utf-8", "replace")}


@command("maintail", "[--bytes=1600]", _fmt_tail, read_only=True)
def cmd_maintail(arb, props):
    """The end of the daemon's own log: ctl maintail [-f] [-BYTES]."""
    n = _prop(props, "bytes", int, 1600)
    return {"data": arb.log_ring.tail(n).decode("utf-8", "replace")}


def _fmt_reread(reply):
    lines = ["%s: %s" % (n, what) for what, key in (("available", "added"), ("changed", "changed"),
                                                   ("disappeared", "removed"))
             for n in reply.get(key, [])]
    return "\n".join(sorted(lines)) or "No config updates to processes"


@command("reread", "", _fmt_reread, read_only=True)
def cmd_reread(arb, props):
    """What reloadconfig would change (supervisorctl reread); nothing is applied."""
    return arb.config_diff(arb._load_new_config())


def _fmt_update(reply):
    lines = ["%s: %s" % (n, what) for what, key in (("added process group", "added"),
                                                   ("updated process group", "changed"),
                                                   ("removed process group", "removed"))
             for n in reply.get(key, [])]
    return "\n".join(sorted(lines)) or "No config updates to processes"


@command("update", "[--waiting]", _fmt_update)
def cmd_update(arb, props):
    """Apply the config file's changes (supervisorctl update = reloadconfig, with a report)."""
    new = arb._load_new_config()
    diff = arb.config_diff(new)

    async def run():
        await arb.reload_config(new)
        return diff
    if props.get("waiting"):
        return _Await(run())
    arb.loop.create_task(arb._guarded(run()))     # the report now; stops may take stopwaitsecs
    return diff


@command("top", "[--sort=cpu] [--interval=1]", read_only=True)
def cmd_top(arb, props):
    """A live view of every process: CPU, memory, age, restarts (keys: c m n s to sort, q to quit)."""
    raise MessageError("top is shown by ctl itself: python circus.py ctl top")


@command("quit", "[--waiting]")
def cmd_quit(arb, props):
    """Stop every watcher and exit the daemon."""
    return _none(arb.stop())


@command("listen", "[topic...]", read_only=True)
def cmd_listen(arb, props):
    """Print pub/sub events (ctl subscribes to the pub/sub endpoint itself)."""
    raise MessageError("invalid message. use a pub/sub socket")


@command("help", "[command]", read_only=True, daemon=False)
def cmd_help(arb, props):
    """Show the commands, or one command's usage (answered by ctl itself)."""


def _error_reply(reason, errno_, msg_id, tb=None):
    return {"status": "error", "reason": reason, "tb": tb, "time": time.time(),
            "errno": errno_, "id": msg_id}


async def dispatch(arbiter, body: bytes, peer=None):
    """One request body -> the reply dict (None for casts). Never raises.

    ``peer``: who sent it (a Peer), None for the daemon's own callers and
    connections whose user is unknown (see check_peer)."""
    msg_id, cast = None, False
    try:
        try:
            msg = json.loads(body.decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            return _error_reply("json invalid", E_INVALID_JSON, None)
        if not isinstance(msg, dict):
            return _error_reply("message invalid: a JSON object is expected", E_MESSAGE_ERROR, None)
        msg_id = msg.get("id")
        cast = msg.get("msg_type") == "cast"
        name = msg.get("command")
        if not isinstance(name, str) or not name:
            raise MessageError("message invalid 'command' is missing")
        cmd = COMMANDS.get(name.lower())
        if cmd is None or cmd.run is None:     # help: ctl's own
            raise CommandError("unknown command: %r" % name, E_UNKNOWN_COMMAND)
        props = msg.get("properties")
        if props is None:
            props = {}
        if not isinstance(props, dict):
            raise MessageError("'properties' should be an object")
        check_peer(arbiter, peer, cmd.name, props)
        result = cmd.run(arbiter, props)
        if isinstance(result, _Await):
            result = await result.awaitable
        elif asyncio.iscoroutine(result):
            if _waiting(props):
                result = await result
            else:
                asyncio.get_running_loop().create_task(arbiter._guarded(result))
                result = {}
        reply = {"status": "ok", "time": time.time()}
        reply.update(result)
        reply["id"] = msg_id
    except CommandError as e:
        reply = _error_reply(str(e), e.errno, msg_id)
    except CircusError as e:
        reply = _error_reply(str(e), E_COMMAND_ERROR, msg_id)
    except OSError as e:
        reply = _error_reply(str(e), E_OS_ERROR, msg_id)
    except Exception as e:      # a bug of ours: log it, answer, stay up
        import traceback
        _log().exception("command failed: %r", body[:200])
        reply = _error_reply("command %r: %s" % (body[:200], e), E_COMMAND_ERROR, msg_id,
                             traceback.format_exc())
    return None if cast else reply


async def call_local(arbiter, command: str, props=None) -> dict:
    """Run one command in the daemon itself (the dashboard, the probes): its reply."""
    body = json.dumps({"command": command, "properties": props or {}, "id": os.urandom(8).hex()})
    return await dispatch(arbiter, body.encode())


# ---------------------------------------------------------------------------
# 13. Plugins: your code fed the events, and Circus's built-in ones
# ---------------------------------------------------------------------------


class Plugin:
    """Base class for plugins: ``[plugin:NAME] use = package.module.MyPlugin``.

    A plugin runs in the daemon, in a thread of its own (it may block), and
    sees every event. Override what you need::

        class Alert(circus.Plugin):
            def handle_event(self, topic, payload):
                if topic.endswith(".flapping"):
                    self.call("stop", name=topic.split(".")[1])

    The section's other keys are in ``self.options`` (strings) and
    ``self.name`` is NAME. ``call()`` runs a control command and returns its
    reply; ``cast()`` sends one without waiting.
    """

    def __init__(self, **options):
        self.options = options
        self.name = None
        self._arbiter = None

    def handle_init(self) -> None:
        """Called once, in the plugin's thread, before the first event."""

    def handle_event(self, topic: str, payload: dict) -> None:
        """Called for every event (``watcher.NAME.EVENT``), in order."""

    def handle_stop(self) -> None:
        """Called once when the daemon stops."""

    def call(self, command: str, **props) -> dict:
        body = json.dumps({"command": command, "properties": props}).encode()
        fut = asyncio.run_coroutine_threadsafe(dispatch(self._arbiter, body), self._arbiter.loop)
        return fut.result(60)

    def cast(self, command: str, **props) -> None:
        body = json.dumps({"command": command, "properties": props, "msg_type": "cast"}).encode()
        asyncio.run_coroutine_threadsafe(dispatch(self._arbiter, body), self._arbiter.loop)


class _PluginRunner:
    """Feeds one plugin its events through a bounded queue, in its own thread."""

    MAX_QUEUED = 10000

    def __init__(self, plugin: Plugin, arbiter):
        import queue
        import threading
        plugin._arbiter = arbiter
        self.plugin = plugin
        self.queue = queue.Queue(self.MAX_QUEUED)
        self.dropped = 0
        self.dead = False
        self.thread = threading.Thread(target=self._run, name="plugin " + str(plugin.name), daemon=True)

    def start(self):
        self.thread.start()

    def __call__(self, topic, payload):
        if self.dead:
            return
        try:       # its own copy: a plugin that changes the dict changes nothing else
            self.queue.put_nowait((topic, json.loads(json.dumps(payload))))
        except __import__("queue").Full:
            if not self.dropped:
                _log().warning("plugin %s is too slow: events dropped", self.plugin.name)
            self.dropped += 1

    def _guard(self, what, *args) -> bool:
        try:
            getattr(self.plugin, what)(*args)
            return True
        except (Exception, SystemExit) as e:
            _log().error("plugin %s: %s failed: %s: %s", self.plugin.name, what, type(e).__name__, e)
            return False

    def _run(self):
        if not self._guard("handle_init"):
            self.dead = True
            _log().error("plugin %s disabled", self.plugin.name)
            return
        while True:
            item = self.queue.get()
            if item is None:
                break
            self._guard("handle_event", *item)
        self._guard("handle_stop")

    def stop(self):
        """Ask it to finish (handle_stop); the daemon waits for it, bounded, at exit.

        Never blocks the loop: with its queue full, the oldest event makes room for the
        end mark (only the loop puts, so there is room then).
        """
        import queue
        if not self.dead and self.thread.is_alive():
            self.dead = True            # no event after the end mark
            try:
                self.queue.put_nowait(None)
            except queue.Full:
                try:
                    self.queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass
                self.queue.put_nowait(None)
            _CLOSING_STREAMS.add(self.thread)


class StatsdEmitter(Plugin):
    """Counts every event on a statsd server (UDP): ``circus.APP.watcher.NAME.EVENT:1|c``.

    Options (Circus's): host (localhost), port (8125), sample_rate (1.0),
    application_name (app).
    """

    def handle_init(self):
        import random
        import socket
        self.addr = (self.options.get("host", "localhost"), _port(self.options.get("port", 8125)))
        self.rate = ranged(to_float, 0, 1)(self.options.get("sample_rate", 1.0))
        self.prefix = "circus.%s." % self.options.get("application_name", "app")
        self.random = random.random
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def handle_event(self, topic, payload):
        if self.rate < 1 and self.random() > self.rate:
            return
        line = "%s%s:1|c%s" % (self.prefix, topic, "" if self.rate >= 1 else "|@%s" % self.rate)
        try:
            self.sock.sendto(line.encode(), self.addr)
        except OSError:
            pass

    def handle_stop(self):
        self.sock.close()


def plugin_limits(cfg: CircusConfig) -> dict:
    """ResourceWatcher sections -> {watcher name (lower case): watchdog option overrides}.

    Circus's ``max_mem`` and ``max_cpu`` are percentages (a bare number);
    a size with a unit (``200M``) is taken as bytes.
    """
    limits = {}
    for name, conf in cfg.plugins:
        if CIRCUS_PLUGINS.get(conf.get("use")) != "watchdog":
            continue
        where = "[plugin:%s]" % name
        target = conf.get("watcher") or conf.get("service")
        if not target or target.lower() not in {w.name.lower() for w in cfg.watchers}:
            raise ConfigError("%s: watcher %r (the 'watcher' key) does not exist" % (where, target))
        mem = str(conf.get("max_mem", "90")).strip()
        opts = {"max_rss": mem + "%" if re.fullmatch(r"\d+(\.\d+)?", mem) else mem,
                "max_cpu": conf.get("max_cpu", 90),
                "watchdog_interval": conf.get("loop_rate", 60)}
        for key in ("min_cpu", "min_mem", "health_threshold", "process_children", "child_signal"):
            if key in conf:
                _log().warning("%s: %s is not supported by the built-in watchdog; ignored", where, key)
        try:
            opts["watchdog_grace"] = _count(conf.get("max_count", 3)) + 1
            probe = WatcherConfig(target)
            for key, value in opts.items():
                probe.set(key, value)
        except ValueError as e:
            raise ConfigError("%s: %s" % (where, e)) from None
        limits[target.lower()] = {k: probe.options[k] for k in opts}
    return limits


def flapping_defaults(cfg: CircusConfig):
    """The [plugin:...] Flapping section's keys (defaults for every watcher), or None."""
    for name, conf in cfg.plugins:
        if CIRCUS_PLUGINS.get(conf.get("use")) == "flapping":
            return {k: v for k, v in conf.items() if k != "use"}
    return None


def configure_plugins(arb, cfg: CircusConfig) -> None:
    """Map [plugin:NAME] sections onto built-ins, user plugins, or one warning each."""
    for name, conf in cfg.plugins:
        conf = dict(conf)
        use = conf.pop("use", None)
        where = "[plugin:%s]" % name
        if not use:
            _log().warning("%s: no 'use = package.module.Class': ignored", where)
            continue
        builtin = CIRCUS_PLUGINS.get(use)
        if builtin == "flapping":
            arb.flapping_plugin = conf
        elif builtin == "watchdog":
            continue            # see plugin_limits(): kept apart, re-read with the config
        elif builtin == "statsd":
            arb.add_plugin(name, StatsdEmitter(**conf))
        elif use in UNSUPPORTED_PLUGINS:
            _log().warning("%s (use = %s): %s; ignored", where, use, UNSUPPORTED_PLUGINS[use])
        else:
            try:
                cls = import_dotted(use, arb.search_dirs)
            except ImportError as e:
                raise ConfigError("%s: use = %s cannot be imported: %s" % (where, use, e)) from None
            if not (isinstance(cls, type) and issubclass(cls, Plugin)):
                raise ConfigError("%s: %s is not a subclass of circus.Plugin (see the README)" % (where, use))
            try:
                plugin = cls(**conf)
            except Exception as e:
                raise ConfigError("%s: %s(%s) failed: %s: %s" % (where, use, ", ".join(conf), type(e).__name__, e)) from None
            arb.add_plugin(name, plugin)


# ---------------------------------------------------------------------------
# 14. Arbiter
# ---------------------------------------------------------------------------

class _RingLogHandler:
    """Keeps the daemon's log lines for `ctl maintail` and publishes them when followed."""

    level = 0

    def __init__(self, arbiter):
        self.arbiter = arbiter
        self.formatter = logging.Formatter(_LOG_FORMAT, "%Y-%m-%d %H:%M:%S")

    def handle(self, record):
        line = self.formatter.format(record) + "\n"
        arb = self.arbiter
        if arb.loop_thread == __import__("threading").get_ident():
            self._publish(line)
        elif arb.loop is not None and not arb.loop.is_closed():     # e.g. a ThreadedStream's log
            arb.loop.call_soon_threadsafe(self._publish, line)

    def _publish(self, line):
        self.arbiter.log_ring.append(line.encode("utf-8", "replace"))
        self.arbiter.publish_followed("log", lambda: {"data": line, "time": time.time()})

    def __getattr__(self, name):        # the rest of the Handler interface: no-ops
        return lambda *a, **k: None


def _not_reloaded(e: Exception) -> CommandError:
    return CommandError("config not reloaded, nothing changed: %s" % e, E_MESSAGE_ERROR)


#: Keys a reloadconfig changes in place (as `set` would): what the daemon does around the
#: processes, not what they run with, so a new schedule or health check restarts nothing.
RELOAD_IN_PLACE = ("critical", "cron", "restart_cron", "backoff_max") + HEALTH_KEYS


class _ConfigDiff:
    """What moving the arbiter to a new config changes (reloadconfig, reread, update).

    What the file says now against what it said when last loaded: a runtime
    incr/set on a watcher the file did not change stays. Sockets:
    ``changed_socks`` (names, changed or gone) close, ``added_socks`` (new or
    changed) are bound. Watchers: ``removed`` go, ``changed`` ((watcher, new
    conf) pairs, incl. those using a changed socket) are replaced, ``resized``
    take the new numprocesses, ``tuned`` only new RELOAD_IN_PLACE values (both:
    a watcher that changed in both ways), ``added`` are new confs; ``to_build``
    are the confs of the watchers to create, in the file's order.
    """

    def __init__(self, old: CircusConfig, watchers, new: CircusConfig):
        self._sockets(old.sockets, new.sockets)
        old_w = {w.name.lower(): w for w in watchers}
        new_w = {wc.name.lower(): wc for wc in new.watchers}
        self.removed = [w for n, w in old_w.items() if n not in new_w]
        self.changed, self.resized, self.tuned = [], [], []
        for n, wc in new_w.items():
            if n in old_w:
                self._compare(old_w[n], wc)
        self.added = [wc for n, wc in new_w.items() if n not in old_w]
        renew = {w.name.lower() for w, _ in self.changed}
        self.to_build = [wc for wc in new.watchers
                         if wc.name.lower() not in old_w or wc.name.lower() in renew]

    def _sockets(self, old: list, new: list):
        old_socks = {s.name: s for s in old}
        new_socks = {s.name: s for s in new}
        self.changed_socks = {n for n in old_socks if n not in new_socks or
                              old_socks[n].key() != new_socks[n].key()}
        self.added_socks = [s for n, s in new_socks.items()
                            if n not in old_socks or n in self.changed_socks]

    def _compare(self, w, wc):
        was = w.file_conf or w.conf     # what the file said, not what incr/set made of it
        # a cron added or dropped is a task that starts at boot now, or no more: replaced
        tuned = RELOAD_IN_PLACE if bool(was.options["cron"]) == bool(wc.options["cron"]) else \
            tuple(k for k in RELOAD_IN_PLACE if k != "cron")
        if any(self._uses(w, s) for s in self.changed_socks) or \
                self._differs_beyond(was, wc, ("numprocesses",) + tuned):
            self.changed.append((w, wc))
            return
        if self._differs_beyond(was, wc, ("numprocesses",)):
            self.tuned.append((w, wc))
        if was.options["numprocesses"] != wc.options["numprocesses"]:
            self.resized.append((w, wc))

    @staticmethod
    def _uses(w, sock_name) -> bool:
        o = w.conf.options
        return ("sockets." + sock_name) in (o["cmd"] + str(o["args"])).lower() or \
            o["use_sockets"] or (o["stdin_socket"] or "").lower() == sock_name

    @staticmethod
    def _differs_beyond(a: WatcherConfig, b: WatcherConfig, keys) -> bool:
        """Do ``a`` and ``b`` differ in more than ``keys``?"""
        saved = {k: a.options[k] for k in keys}
        try:
            a.options.update((k, b.options[k]) for k in keys)
            return a.key() != b.key()
        finally:
            a.options.update(saved)

    def names(self) -> dict:
        """Names added, changed (incl. resized) and removed, for reread/update."""
        return {"added": sorted(wc.name for wc in self.added),
                "changed": sorted({w.name for w, _ in self.changed + self.resized + self.tuned}),
                "removed": sorted(w.name for w in self.removed)}


class _OnDemand:
    """on_demand watchers start on the first connection to one of their sockets.

    At start-up the arbiter arms such a watcher instead of starting it: the
    loop watches its listening sockets, and the first readable one (a
    connection in the backlog) disarms them all and starts it, unless it was
    removed or started meanwhile. Stopping it (stop, quit, reloadconfig)
    disarms them too.
    """

    def __init__(self, arbiter):
        self.arbiter = arbiter

    def arm(self, w) -> bool:
        """Watch the sockets ``w`` uses; False (start it now) if it uses none."""
        o = w.conf.options
        text = (o["cmd"] + " " + str(o["args"] or "")).lower()
        fds = [s.fileno() for name, s in self.arbiter.sockets.items() if s.sock is not None and
               (o["use_sockets"] or ("sockets." + name) in text)]
        if not fds:
            _log().warning("watcher %s: on_demand needs a socket it uses; started now", w.name)
            return False
        for fd in fds:
            self.arbiter.loop.add_reader(fd, self._fire, w)
        w.on_demand_fds = fds
        return True

    def disarm(self, w) -> None:
        for fd in getattr(w, "on_demand_fds", ()):
            self.arbiter.loop.remove_reader(fd)
        w.on_demand_fds = []

    def _fire(self, w):
        self.disarm(w)
        arb = self.arbiter
        if w in arb.watchers and w.state == ProcState.STOPPED:
            _log().info("watcher %s: activity on its socket, starting (on_demand)", w.name)
            arb.loop.create_task(arb._guarded(_locked(w, w.start)))


class _HupReloads:
    """The SIGHUP handler: reloadconfig, then a graceful reload of the watchers it did
    not start afresh (a plain reload for an arbiter with no config file).

    SIGHUPs that come during a pass merge into one more pass after it, however
    many came. A broken file changes nothing (one error line). Under systemd
    each pass is framed by RELOADING=1 (with MONOTONIC_USEC, for
    Type=notify-reload) and READY=1.
    """

    def __init__(self, arbiter):
        self.arbiter = arbiter
        self.task = None        # the pass under way
        self.again = False      # SIGHUPs came meanwhile

    def __call__(self):
        arb = self.arbiter
        if arb.stopping:
            return
        if self.task is not None and not self.task.done():
            _log().info("got SIGHUP: merged into the reload under way (one more pass follows it)")
            self.again = True
            return
        _log().info("got SIGHUP: reloading the config, then the watchers it did not change")
        self.task = arb.loop.create_task(self._passes())

    async def _passes(self):
        arb = self.arbiter
        again = True
        while again and not arb.stopping:
            self.again = False
            arb.sd_notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000))
            try:
                if arb.config is not None and arb.config.path:
                    await arb._guarded(arb.reload_config(reload_rest=True))
                else:
                    await arb._guarded(arb.reload())
            finally:
                if not arb.stopping:
                    arb.sd_notify("READY=1")
            again = self.again


#: What builds the daemon's channels (control, pub/sub, stats, /metrics, dashboard): async
#: functions arbiter -> [channel], run by Arbiter.start(). The channels section at the end
#: registers start_channels here.
CHANNEL_STARTERS: list = []


class Arbiter:
    """Many watchers and sockets, one event loop, the control and pub/sub channels.

    ``run()`` blocks in its own loop (with signal handlers: TERM/INT/QUIT
    quit, HUP reloads), and so does ``start()`` called outside a running loop
    (Circus's library use); ``await start()`` / ``await stop()`` run it inside
    the caller's loop. Events reach every callable in ``listeners`` as
    ``(topic, payload)``; the pub/sub channel is one of them.
    """

    def __init__(self, watchers=(), endpoint: str | None = DEFAULT_ENDPOINT,
                 pubsub_endpoint: str | None = DEFAULT_PUBSUB, *, sockets=(), check_delay=1.0,
                 warmup_delay=0, multicast_endpoint=None, stats_endpoint=None,
                 endpoint_owner=None, config: CircusConfig | None = None, umask=None):
        self.endpoint = endpoint
        self.pubsub_endpoint = pubsub_endpoint
        self.stats_endpoint = stats_endpoint
        self.multicast_endpoint = multicast_endpoint
        self.endpoint_owner = endpoint_owner
        self.check_delay = check_delay
        self.warmup_delay = warmup_delay
        self.umask = umask
        self.config = config
        self.search_dirs = (os.path.dirname(config.path),) if config and config.path else ()
        self.sv_events = SvEventHub(self)      # [eventlistener:x] pools; idle without one
        self.listeners: list = [self.sv_events]
        self.flapping_plugin = None     # [plugin:x] use = ...Flapping settings: defaults for all
        self.plugin_runners: list = []
        self.watchdogs: dict = {}       # watcher -> Watchdog (watchers with max_rss / max_cpu)
        self.schedules: dict = {}       # watcher -> Schedule (watchers with cron / restart_cron)
        self.plugin_limits: dict = {}   # watcher name -> limits from a ResourceWatcher section
        self.metrics_cache: dict = {}   # psutil objects of /metrics scrapes
        self.max_processes = 10000      # per watcher, for add/incr/set over the control channel
        self.allow_insecure_endpoint = False    # a TCP endpoint off this host, with no auth
        self.curve_secret_key = None    # CurveZMQ on every channel when set (see CurveServer)
        self.curve_authorized_keys = None
        self.curve_owner_keys = None    # their clients get endpoint_owner's rights only
        self.statsd = False             # publish the stats channel on stats_endpoint
        self.metrics_endpoint = None
        self.httpd = None               # (host, port, token): the web dashboard
        self.sv_http = []               # SvHttpConf: Supervisor's XML-RPC servers
        self.snapshot_cache: dict = {}  # psutil objects of `snapshot` (the dashboard's CPU %)
        self.started = None             # epoch time of start()
        self.log_ring = RingBuffer()    # the daemon's recent log, for `ctl maintail`
        self.loop_thread = None
        self._log_handler = None
        self.sockets: dict = {}
        self.watchers: list = []
        self.channels: list = []
        self.loop = None
        self._lock = None           # serialises arbiter-wide operations (start-up included)
        self.stopping = False       # quit has begun: nothing spawns any more
        self.booting = True         # start-up has yet to start the autostart watchers (`ready`)
        self.shutdown_timeout = None    # a quit's budget: then SIGKILL to what is left
        self.exit_code = None       # set by critical_exit: what run() returns (else 0)
        self.on_demand = _OnDemand(self)
        self.keep_trees = None      # (subreaper, cgroup): the daemon's whole-tree stops (TreeKeeper)
        self._done = None
        self._socket_confs = list(sockets)
        for w in watchers:
            self._attach(w if isinstance(w, Watcher) else self._make_watcher(w))
        self._link_dependencies()

    @classmethod
    def from_config(cls, cfg: CircusConfig) -> "Arbiter":
        """An Arbiter for a CircusConfig (from load_config)."""
        arb = cls(endpoint=cfg.endpoint, pubsub_endpoint=cfg.pubsub_endpoint,
                  check_delay=cfg.check_delay, warmup_delay=cfg.warmup_delay,
                  multicast_endpoint=cfg.multicast_endpoint or None,
                  stats_endpoint=cfg.stats_endpoint, endpoint_owner=cfg.endpoint_owner,
                  config=cfg, umask=cfg.umask, sockets=cfg.sockets)
        arb.statsd, arb.metrics_endpoint = cfg.statsd, cfg.metrics_endpoint
        arb.httpd = (cfg.httpd_host, cfg.httpd_port, cfg.httpd_token) if cfg.httpd else None
        arb.sv_http = cfg.sv_http
        arb.allow_insecure_endpoint = cfg.allow_insecure_endpoint
        arb.curve_secret_key, arb.curve_authorized_keys = cfg.curve_secret_key, cfg.curve_authorized_keys
        arb.curve_owner_keys = cfg.curve_owner_keys
        arb.max_processes, arb.shutdown_timeout = cfg.max_processes, cfg.shutdown_timeout
        arb.flapping_plugin, arb.plugin_limits = flapping_defaults(cfg), plugin_limits(cfg)
        for wc in cfg.watchers:
            arb._attach(arb._make_watcher(wc))
        arb._link_dependencies()
        configure_plugins(arb, cfg)
        return arb

    def add_plugin(self, name: str, plugin: "Plugin") -> None:
        """Run ``plugin`` in this arbiter: it gets every event (from start on)."""
        plugin.name = name
        runner = _PluginRunner(plugin, self)
        self.plugin_runners.append(runner)
        self.listeners.append(runner)
        if self.loop is not None:
            runner.start()

    def _watch_resources(self, w):
        """(Re)create the watchdog of ``w``; none once it is removed or has no limits."""
        old = self.watchdogs.pop(w, None)
        if old is not None:
            old.stop()
        o = dict(w.conf.options)
        o.update(self.plugin_limits.get(w.name.lower(), {}))
        if (o["max_rss"] is not None or o["max_cpu"] is not None) and w in self.watchers:
            dog = self.watchdogs[w] = Watchdog(w, o)
            if self.loop is not None:
                dog.start(self.loop)
        self._watch_health(w)

    def _watch_health(self, w):
        """(Re)create the HealthCheck of ``w`` (none once removed or without health_check);
        the processes already up are probed from now on."""
        if w.health is not None:
            w.health.stop()
        w.health = HealthCheck(w) if w.conf.options["health_check"] and w in self.watchers else None
        for p in list(w.processes.values()) if w.health is not None else ():
            if p.state == ProcState.RUNNING:
                w.health.up(p)

    def _prune_watchdogs(self):
        for w in [w for w in self.watchdogs if w not in self.watchers]:
            self.watchdogs.pop(w).stop()
        for w in [w for w in self.schedules if w not in self.watchers]:
            self.schedules.pop(w).stop()

    def _schedule(self, w):
        """(Re)arm the cron / restart_cron timer of ``w``; none once it is removed or has none."""
        old = self.schedules.pop(w, None)
        if old is not None:
            old.stop()
        o = w.conf.options
        kind = "cron" if o["cron"] else "restart_cron"
        if o[kind] and w in self.watchers:
            s = self.schedules[w] = Schedule(o[kind], lambda: self._scheduled(w, kind), kind)
            s.last = old.last if old is not None else None      # `set`: a minute still runs once
            if self.loop is not None:
                s.start()

    def _scheduled(self, w, kind):
        """The time came: ``cron`` starts ``w`` as `start NAME` does (not while a run is still
        going: no stacking), ``restart_cron`` restarts it as `restart NAME` (not if stopped)."""
        async def run():
            if self.stopping or w not in self.watchers:
                return
            if kind == "restart_cron":
                if w.state == ProcState.STOPPED:
                    _log().info("watcher %s: restart_cron: stopped, left so", w.name)
                    return
                _log().info("watcher %s: restart_cron: restarting", w.name)
                return await _locked(w, w.restart)
            if w.state != ProcState.STOPPED and any(p.alive for p in w.processes.values()):
                _log().warning("watcher %s: cron: the last run is still going; this run is skipped",
                               w.name)
                return
            _log().info("watcher %s: cron: starting", w.name)
            return await self.start_watcher(w)      # what it depends on first, as `start NAME`
        self.loop.create_task(self._guarded(run()))

    def _make_watcher(self, spec) -> Watcher:
        if isinstance(spec, WatcherConfig):
            import copy
            try:        # a hook or stream class that cannot be imported
                w = Watcher(spec.name, config=copy.deepcopy(spec), search_dirs=self.search_dirs)
            except ValueError as e:
                raise ConfigError("%s: %s" % (spec.where or "watcher " + spec.name, e)) from None
            w.file_conf = spec
            return w
        spec = dict(spec)
        name = spec.pop("name")
        return Watcher(name, spec.pop("cmd", None), spec.pop("args", None),
                       search_dirs=self.search_dirs, **spec)

    def _attach(self, w: Watcher):
        w.on_event = self.emit
        w.on_output_event = self._publish_output
        w.sockets = self.sockets
        w.arbiter = self
        w.flapping = Flapping.from_settings(self.flapping_plugin, w.conf.free) \
            if w.conf.options["check_flapping"] else None
        self.watchers.append(w)
        if self.loop is not None:
            w.lock = asyncio.Lock()
        self._watch_resources(w)
        self._schedule(w)

    # -- lookups ---------------------------------------------------------------
    def get_watcher(self, name) -> Watcher:
        """A watcher by name, any case; MessageError if there is none."""
        low = str(name).lower()
        for w in self.watchers:
            if w.name.lower() == low:
                return w
        raise MessageError("program %s not found" % name)

    def iter_watchers(self, reverse=False) -> list:
        """By priority, highest first (stable on config order); reverse for stopping."""
        ws = sorted(self.watchers, key=lambda w: -w.boot_priority)
        return list(reversed(ws)) if reverse else ws

    # -- depends_on: start after what a watcher depends on is ready, stop before it ------
    def dependencies_of(self, w) -> list:
        """The watchers ``w`` depends on (depends_on: names or Supervisor groups)."""
        names = w.conf.options["depends_on"]
        if not names:
            return []
        return [x for x in self.watchers if x is not w and any(depends_on_matches(n, x.conf) for n in names)]

    def dependants_of(self, w) -> list:
        """The watchers that depend on ``w``."""
        return [x for x in self.watchers if x.conf.options["depends_on"] and w in self.dependencies_of(x)]

    def dependencies_ready(self, w) -> bool:
        """Is everything ``w`` depends on ready (Watcher.ready_now)?"""
        return all(d.ready_now() for d in self.dependencies_of(w))

    def dependants_up(self, ws) -> list:
        """What depends on ``ws``, transitively, and runs or waits: `stop` stops it first."""
        out, todo = [], list(ws)
        while todo:
            for x in self.dependants_of(todo.pop()):
                if x not in out and x not in ws and x.state not in (ProcState.STOPPED, ProcState.DONE):
                    out.append(x)
                    todo.append(x)
        return out

    def _link_dependencies(self) -> None:
        """Watch the readiness of the watchers others depend on (only those: no work on the
        others' spawns). ConfigError for a name that is not there or a cycle."""
        check_dependencies([w.conf for w in self.watchers])
        needed = set()
        for w in self.watchers:
            needed.update(self.dependencies_of(w))
        for w in self.watchers:
            w.on_ready = self._dependency_ready if w in needed else None

    def _dependency_ready(self, dep) -> None:
        """``dep`` got ready: start the watchers waiting for it that now have all they need."""
        for w in self.dependants_of(dep):
            if w.state == ProcState.WAITING and self.dependencies_ready(w):
                w.queue(lambda w=w: self._start_waiting(w))

    async def _start_waiting(self, w) -> None:
        if w.state == ProcState.WAITING and not self.stopping and w in self.watchers:   # under its lock
            await w.start()

    async def start_watcher(self, w, started=None) -> dict:
        """Start ``w`` after what it depends on that is stopped (transitively: `start b`
        starts a first); ``w`` waits (WAITING) until they are ready. ``started``: the
        watchers this pass already started."""
        started = set() if started is None else started
        if w in started:
            return {"started": [], "kept": list(w.processes)}
        started.add(w)
        for d in self.dependencies_of(w):
            if d.state == ProcState.STOPPED:
                await self.start_watcher(d, started)
        async with w.lock:
            return await w.start()

    def publish_followed(self, topic: str, make_payload) -> None:
        """Send to listeners that follow ``topic`` (output, log), only if someone does.

        ``make_payload()`` builds the payload: it is not even called (no decoding
        of output) while nobody follows, which is the usual case on this hot path.
        """
        followers = [l for l in self.listeners if getattr(l, "prefixes", None)]
        if not followers:
            return
        raw, payload = topic.encode(), None
        for listener in followers:
            if listener.wants(raw):
                payload = payload or make_payload()
                listener(topic, payload)

    def _publish_output(self, w, chunk):
        if w.conf.sv:
            self.sv_events.output(w, chunk)
        self.publish_followed("output.%s.%s" % (w.topic_name, chunk["name"]),
                              lambda: {"data": chunk["data"].decode("utf-8", "replace"),
                                       "pid": chunk["pid"], "time": time.time()})

    def emit(self, topic, payload) -> None:
        """Hand an event to every listener (the pub/sub channel is one)."""
        for listener in list(self.listeners):
            try:
                listener(topic, payload)
            except Exception:
                _log().exception("event listener %r failed", listener)

    # -- lifecycle ---------------------------------------------------------------
    def run(self) -> int:
        """Block until quit; returns the exit code (0, or critical_exit's code).

        Under systemd (``Type=notify``: $NOTIFY_SOCKET) it reports READY=1
        once started and STOPPING=1 on quit; the variable is not passed on.
        """
        self._notify_socket = os.environ.pop("NOTIFY_SOCKET", None)
        return asyncio.run(self._serve())

    async def _serve(self):
        import threading        # signal handlers can only be set from the main thread
        await self._start(handle_signals=threading.current_thread() is threading.main_thread())
        if not self.stopping:       # a quit during start-up already said STOPPING=1
            self.sd_notify("READY=1\nMAINPID=%d" % os.getpid())
        await self._done
        return 0 if self.exit_code is None else self.exit_code

    _notify_socket = None

    def sd_notify(self, message: str) -> None:
        """Send one sd_notify(3) message, if the daemon was started with $NOTIFY_SOCKET."""
        path = self._notify_socket
        if not path:
            return
        import socket
        if path.startswith("@"):
            path = "\0" + path[1:]         # the abstract namespace
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(path)
                s.send(message.encode())
        except OSError as e:
            _log().warning("NOTIFY_SOCKET %s: %s", self._notify_socket, e)

    def start(self, handle_signals=False):
        """Bind sockets and channels, then start the watchers in priority order.

        Inside a running loop: ``await arbiter.start()`` returns once started.
        Outside one, as in Circus: runs the arbiter here until it is stopped (a
        signal, the quit command, ``stop()`` from another thread or a callback).
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self.run()
        return self._start(handle_signals)

    async def _start(self, handle_signals=False) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop_thread = __import__("threading").get_ident()
        self.started = time.time()
        self.stopping, self.booting = False, True
        self.exit_code = None
        self._lock = asyncio.Lock()
        self._log_handler = _RingLogHandler(self)
        _log().addHandler(self._log_handler)
        self._done = self.loop.create_future()
        for w in self.watchers:
            w.lock = asyncio.Lock()
        if self.umask is not None:
            os.umask(self.umask)
        self._bind_sockets(self._socket_confs)
        await self._start_channels()
        for runner in self.plugin_runners:
            runner.start()
        for dog in self.watchdogs.values():
            dog.start(self.loop)
        for sched in self.schedules.values():
            sched.start()
        if self.config is not None and self.config.user:
            drop_privileges(self.config.user)       # after binding, as supervisord does
        if self.keep_trees:
            _log().info("%s", TREES.setup(*self.keep_trees))
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                self.loop.add_signal_handler(sig, self._on_quit_signal, sig)
            self.loop.add_signal_handler(signal.SIGHUP, _HupReloads(self))
            if hasattr(signal, "SIGWINCH"):
                signal.signal(signal.SIGWINCH, signal.SIG_IGN)
            if hasattr(signal, "SIGXFSZ"):      # a file size limit: EFBIG, not death
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # under the arbiter lock, as reload/reloadconfig/quit are: none of them acts on a
        # half-started arbiter (read-only commands take no lock and answer meanwhile)
        self.sv_events.start()
        async with self._lock:
            await self.start_watchers()
        self.booting = False
        if not self.stopping:
            _log().info("arbiter ready: %d watchers, control on %s", len(self.watchers), self.endpoint)

    def _bind_sockets(self, confs):
        for conf in confs:
            s = CircusSocket(conf)
            try:
                s.bind_and_listen()
            except OSError as e:
                self._close_sockets()
                raise CircusError("socket %s (%s): cannot bind: %s" % (
                    conf.name, conf.path or "%s:%s" % (conf.host, conf.port), e.strerror or e)) from None
            self.sockets[conf.name] = s
            _log().info("socket %s bound: %s", s.name, s.info())

    async def _start_channels(self):
        if self.endpoint or self.pubsub_endpoint or self.multicast_endpoint or self.statsd \
                or self.metrics_endpoint or self.httpd or self.sv_http:
            for start in CHANNEL_STARTERS:      # start_channels, registered by its section
                self.channels += await start(self)

    async def start_watchers(self, names=None) -> None:
        """Start the autostart watchers (or those given) by priority."""
        ws = self.iter_watchers() if names is None else \
            sorted((w for w in self.watchers if w in names), key=lambda w: -w.priority)
        started = set()
        for w in ws:
            if self.stopping:           # a quit came in: it stops what did start
                break
            if names is not None or w.conf.starts_at_boot:
                if names is None and w.conf.options["on_demand"] and self.on_demand.arm(w):
                    continue
                try:
                    await self.start_watcher(w, started)
                except CircusError as e:    # one broken watcher never stops the others
                    _log().error("%s", e)
                if self.warmup_delay:
                    await asyncio.sleep(self.warmup_delay)

    async def stop_watchers(self, watchers=None, deps=None) -> None:
        """Stop in reverse priority order; watchers of equal priority stop together.
        Supervisor's `stop g:*` / `stop all` go lowest priority first, as its start.
        depends_on wins over priority: a watcher stops once what depends on it has
        (``deps``: watcher -> its dependencies, for watchers already detached)."""
        if watchers is None:
            ws, prio = self.iter_watchers(reverse=True), (lambda w: w.boot_priority)
        else:
            ws, prio = sorted(watchers, key=lambda w: -w.priority if w.conf.group else w.priority), \
                (lambda w: w.priority)
        if deps is None:
            deps = {x: self.dependencies_of(x) for x in ws if x.conf.options["depends_on"]}
        errors = []
        while ws:
            held = {d for x in ws if x in deps for d in deps[x]}    # still needed by one not stopped
            free = [w for w in ws if w not in held] or ws
            group = [w for w in free if prio(w) == prio(free[0])]
            gone = set(group)
            ws = [w for w in ws if w not in gone]

            async def stop_one(w):
                self.on_demand.disarm(w)
                async with w.lock:
                    await w.stop()
            # one watcher's failure neither stops the others nor the lower priorities
            results = await asyncio.gather(*(stop_one(w) for w in group), return_exceptions=True)
            errors += [e for e in results if isinstance(e, Exception)]
        if errors:
            raise errors[0]

    def stop(self):
        """Stop every watcher, close sockets and channels; run() then returns.

        In the arbiter's loop it returns a task (``await arbiter.stop()``, or
        fire and forget from a callback). From another thread it waits until
        the arbiter is down; once stopped (or never started) it does nothing.
        """
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and running is self.loop:
            return running.create_task(self._stop(asyncio.current_task()))
        if self.loop is None or self.loop.is_closed() or self._done is None or self._done.done():
            return None
        import concurrent.futures
        try:
            return asyncio.run_coroutine_threadsafe(self._stop(None), self.loop).result()
        except (RuntimeError, concurrent.futures.CancelledError, asyncio.CancelledError):
            return None         # it stopped meanwhile (a quit, a signal)

    async def _stop(self, caller) -> None:
        # Called by the quit command's own handler (``caller``), it returns once the
        # watchers are down, so the handler can still send its reply; the channels
        # close right after.
        if self.stopping:       # a second quit (signal, command): the first one is under way
            if not any(ch.owns(caller) for ch in self.channels):
                await asyncio.shield(self._done)
            return
        self.sd_notify("STOPPING=1")
        self.sv_events.stopping()
        self.stopping = True        # a start-up or top-up in progress ends at its next spawn
        await self._stop_all_within(self.shutdown_timeout)
        finish = self.loop.create_task(self._finish())
        if not any(ch.owns(caller) for ch in self.channels):
            await finish

    async def _stop_all_within(self, timeout) -> None:
        """Stop every watcher; once ``timeout`` s (shutdown_timeout) have passed, SIGKILL
        what is left and go on (its reaping gets a moment, the rest is abandoned)."""
        async def stop_all():
            async with self._lock:
                try:
                    await self.stop_watchers()
                except Exception:       # logged; the daemon still exits
                    _log().exception("while stopping the watchers")
        task = self.loop.create_task(stop_all())
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if done:
            return
        _log().warning("shutdown_timeout (%g s) reached: SIGKILL to the %d processes still running",
                       timeout, self._kill_left())
        done, _ = await asyncio.wait({task}, timeout=2.0)
        if not done:
            task.cancel()

    def _kill_left(self) -> int:
        """SIGKILL to every process of ours still alive, and all it left (kill_tree); how
        many there were."""
        left = [p for w in self.watchers for p in list(w.processes.values()) + list(w.retiring.values())
                if p.alive]
        for p in left:
            if not p.stopping:      # its death is part of the quit, not an exit to act on
                p.stopping = True
                p.enter(ProcState.STOPPING, publish=False)
            p.kill_tree(signal.SIGKILL)
        return len(left)

    def critical_exit(self, watcher_name: str, code: int, reason: str):
        """A critical watcher gave up (or a health check says so; ``reason`` follows its name
        in the log line): stop everything, in reverse priority, then the daemon exits with
        ``code`` (run() returns it). The first call wins; during a quit it does nothing.
        Returns the stop task, or None."""
        if self.stopping or self.exit_code is not None:
            return None
        self.exit_code = code
        _log().error("watcher %s %s: stopping everything, then exiting with code %d",
                     watcher_name, reason, code)
        return self.stop()

    async def _finish(self):
        for w in self.watchers:
            w._close_streams(final=True)
        for runner in self.plugin_runners:
            runner.stop()
        for dog in self.watchdogs.values():
            dog.stop()
        for sched in self.schedules.values():
            sched.stop()
        for w in self.watchers:
            if w.health is not None:
                w.health.stop()
        if self._log_handler is not None:
            _log().removeHandler(self._log_handler)
            self._log_handler = None
        for ch in self.channels:
            await ch.close()
        self.channels = []
        self._close_sockets()
        nl = _NOTIFY_LISTENERS.pop(self.loop, None)
        if nl is not None:
            nl.close()
        if self.keep_trees:
            await TREES.close()         # nothing left under the daemon; reaped before cw closes
        cw = _CHILD_WATCHERS.pop(self.loop, None)
        if cw is not None:
            cw.close()
        if _CLOSING_STREAMS:        # user streams finish their queue (bounded) before we exit
            await self.loop.run_in_executor(None, join_streams, 5.0)
        if self._done is not None and not self._done.done():
            self._done.set_result(True)

    def _on_quit_signal(self, sig):
        _log().info("got %s: stopping", signame(sig))
        self.stop()      # a task of its own

    async def _guarded(self, coro):
        try:
            return await coro
        except CircusError as e:
            _log().error("%s", e)
        except Exception:
            _log().exception("unexpected error")

    async def reload(self, graceful=True, sequential=False) -> None:
        """Reload every running watcher (stopped ones stay stopped: Circus bug 5)."""
        async with self._lock:
            self._refuse_if_quitting("reload")
            await self._reload_watchers(graceful, sequential)

    def _refuse_if_quitting(self, what):
        if self.stopping:       # queued before a quit (e.g. a SIGHUP storm): dropped
            raise CommandError("%s dropped: the daemon is quitting" % what)

    async def _reload_watchers(self, graceful=True, sequential=False, skip=()) -> None:
        errors = []
        for w in self.iter_watchers():
            if self.stopping:
                break
            if w.state in (ProcState.STOPPED, ProcState.WAITING, ProcState.DONE) or w in skip:
                continue
            async with w.lock:
                try:
                    await w.reload(graceful=graceful, sequential=sequential)
                except CommandError as e:   # one aborted reload does not stop the others
                    errors.append(str(e))
            if self.warmup_delay:
                await asyncio.sleep(self.warmup_delay)
        if errors:
            raise CommandError("; ".join(errors), E_COMMAND_ERROR)

    # -- watchers at runtime -----------------------------------------------------
    def add_watcher(self, name, cmd, args=None, options=None) -> Watcher:
        """Create and attach a watcher (not started). Raises CommandError/MessageError."""
        if any(w.name.lower() == str(name).lower() for w in self.watchers):
            raise CommandError("%r already exist" % name)
        try:
            w = Watcher(name, cmd, args, search_dirs=self.search_dirs, **(options or {}))
        except ValueError as e:
            raise MessageError(str(e)) from None
        self._attach(w)
        self.emit("watcher.%s.add" % w.topic_name, {"time": time.time()})
        return w

    def rm_watcher(self, w: Watcher, nostop=False) -> object:
        """Detach a watcher; returns a coroutine that stops it (nothing with nostop)."""
        self.watchers.remove(w)
        self._watch_resources(w)
        self._schedule(w)
        w._user_action(False)           # no flapping retry for a removed watcher
        self.emit("watcher.%s.remove" % w.topic_name, {"time": time.time()})
        if nostop:
            for p in list(w.processes.values()):
                p.on_exit = None        # left running, no longer ours to respawn
            w._close_streams(final=True)
            return _none(asyncio.sleep(0))

        async def stop_and_close():
            await w.stop()
            w._close_streams(final=True)
            TREES.remove(w.tree)
        return _none(_locked(w, stop_and_close))

    # -- config reload: parse completely (errors change nothing), diff, apply the differences
    def _load_new_config(self) -> CircusConfig:
        if not self.config or not self.config.path:
            raise CommandError("no config file to reload: this arbiter was built in Python")
        try:
            new = load_config(self.config.path)
            plugin_limits(new)      # a ResourceWatcher section is checked too, before any reply
            return new
        except ConfigError as e:
            raise _not_reloaded(e) from None

    def config_diff(self, new: CircusConfig) -> dict:
        """Names added, changed (incl. resized) and removed, for reread/update."""
        return _ConfigDiff(self.config, self.watchers, new).names()

    async def reload_config(self, new: CircusConfig | None = None, reload_rest=False) -> None:
        """Re-read the file; apply only what changed. A broken file changes nothing.

        ``reload_rest`` (SIGHUP): then a graceful reload of every running
        watcher this did not start afresh.
        """
        new, plugin_settings = self._parse_new_config(new)         # 1. parse
        async with self._lock:
            self._refuse_if_quitting("reloadconfig")
            diff = _ConfigDiff(self.config, self.watchers, new)     # 2. diff
            try:        # built before anything stops: a hook that cannot be imported changes nothing
                fresh = [self._make_watcher(wc) for wc in diff.to_build]
            except ConfigError as e:
                raise _not_reloaded(e) from None
            await self._apply_config(new, plugin_settings, diff, fresh)     # 3. apply
            if reload_rest:
                await self._reload_watchers(skip=fresh)

    def _parse_new_config(self, new: CircusConfig | None):
        """The new file, parsed completely, and its plugin settings (flapping, limits)."""
        new = new or self._load_new_config()
        try:
            plugin_settings = flapping_defaults(new), plugin_limits(new)
        except ConfigError as e:
            raise _not_reloaded(e) from None
        for w in new.warnings:
            _log().warning("%s", w)
        return new, plugin_settings

    async def _apply_config(self, new: CircusConfig, plugin_settings, diff: _ConfigDiff, fresh) -> None:
        """Only the differences: what goes stops before its sockets close, the new
        sockets are bound before the ``fresh`` watchers start."""
        self._take_globals(new)
        self.flapping_plugin, self.plugin_limits = plugin_settings
        gone = diff.removed + [w for w, _ in diff.changed]
        held = self.dependants_up(gone)     # they depend on one being replaced: stop first, start after
        deps = {x: self.dependencies_of(x) for x in gone + held}    # before they are detached
        for w in gone:
            self.watchers.remove(w)
            self.emit("watcher.%s.remove" % w.topic_name, {"time": time.time()})
        await self.stop_watchers(gone + held, deps)
        self._let_go(gone)
        self._close_sockets(diff.changed_socks)
        self._bind_sockets(diff.added_socks)
        self.config = new
        for w, wc in diff.tuned:
            self._tune(w, wc)
            w.file_conf = wc
        for w, wc in diff.resized:
            w.file_conf = wc
            async with w.lock:
                await w.set_numprocesses(wc.options["numprocesses"])
        for w in fresh:
            self._attach(w)
            self.emit("watcher.%s.add" % w.topic_name, {"time": time.time()})
        self._link_dependencies()
        await self.start_watchers([w for w in fresh if w.conf.starts_at_boot] + held)

    def _tune(self, w, wc) -> None:
        """The RELOAD_IN_PLACE keys the file changed, taken as `set` takes them (a runtime
        `set` of another key stays); schedule and health check re-armed."""
        was = w.file_conf or w.conf
        for k in RELOAD_IN_PLACE:
            if was.options[k] != wc.options[k]:
                w.conf.options[k] = wc.options[k]
                w.emit("updated", key=k)
        self._watch_resources(w)
        self._schedule(w)

    def _take_globals(self, new: CircusConfig) -> None:
        old = self.config
        if new.globals_key() == old.globals_key():
            return
        self.check_delay, self.warmup_delay = new.check_delay, new.warmup_delay
        self.shutdown_timeout = new.shutdown_timeout
        for k in ("endpoint", "pubsub_endpoint", "multicast_endpoint", "curve_secret_key",
                  "curve_owner_keys", "endpoint_owner", "subreaper", "cgroup"):
            if getattr(new, k) != getattr(old, k):
                _log().warning("reloadconfig: %s changed; it takes effect at the next "
                               "daemon start (a restart keeps the old one)", k)

    def _let_go(self, ws) -> None:
        """Of stopped watchers no longer ours: no flapping retry, streams closed, no watchdog."""
        for w in ws:
            w._user_action(False)
            w._close_streams(final=True)
            self._watch_health(w)
            TREES.remove(w.tree)
        self._prune_watchdogs()

    def _close_sockets(self, names=None) -> None:
        for n in list(self.sockets) if names is None else names:
            s = self.sockets.pop(n, None)
            if s is not None:
                s.close()

    async def restart(self) -> None:
        """Full restart in this process: stop all, re-read the config, rebind, start.

        If the file is now broken, the old config is started again (nothing lost).
        """
        try:
            new = self._load_new_config() if self.config and self.config.path else None
        except CommandError as e:
            _log().error("%s; restarting with the previous config", e)
            new = None
        async with self._lock:
            await self.stop_watchers()
            if new is not None:
                self._close_sockets()
                self._take_globals(new)         # shutdown_timeout, check_delay...
                self.config = new
                old, self.watchers = self.watchers, []
                self._let_go(old)
                try:
                    self.flapping_plugin, self.plugin_limits = flapping_defaults(new), plugin_limits(new)
                except ConfigError as e:
                    _log().error("%s", e)
                for wc in new.watchers:
                    self._attach(self._make_watcher(wc))
                self._link_dependencies()
                self._bind_sockets(new.sockets)
            await self.start_watchers()


def get_arbiter(watchers, controller=DEFAULT_ENDPOINT, pubsub_endpoint=DEFAULT_PUBSUB,
                sockets=(), check_delay=1.0, warmup_delay=0, **kw) -> Arbiter:
    """Build an Arbiter from dicts, like Circus's ``get_arbiter``.

    ``watchers`` are dicts with ``cmd`` and any watcher option; ``name`` defaults to the
    command's base name, as in Circus (``{"cmd": "python app.py"}`` is ``python``);
    ``sockets`` are dicts with ``name`` and socket keys (host, port, path...).
    Pass ``controller=None, pubsub_endpoint=None`` for no ZeroMQ channels.
    """
    watchers = [dict(w, name=os.path.basename(str(w.get("cmd") or "").split(" ")[0]))
                if isinstance(w, dict) and "name" not in w else w for w in watchers]
    socks = [s if isinstance(s, SocketConfig) else SocketConfig(**s) for s in sockets]
    return Arbiter(watchers, controller, pubsub_endpoint, sockets=socks,
                   check_delay=check_delay, warmup_delay=warmup_delay, **kw)


# ---------------------------------------------------------------------------
# 15. ZeroMQ channels (control, pub/sub, multicast discovery)
# ---------------------------------------------------------------------------

def _ipc_in_use(path: str) -> bool:
    """Does a live process listen on this ipc path? (ZeroMQ would silently take it over.)"""
    import socket
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False        # a stale file from a daemon that died: ours to replace


def _ipc_folder(path: str, what: str, endpoint: str, sticky_ok=True) -> int:
    """Open an ipc socket's folder (an fd), refusing one where others could swap files.

    A sticky folder others can write (/tmp) is accepted with ``sticky_ok``: there
    nobody can rename or remove a file of ours."""
    import stat
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise CircusError("%s %s: cannot open its folder %s: %s" % (what, endpoint, folder,
                                                                   e.strerror)) from None
    st = os.fstat(fd)
    shared = st.st_mode & 0o022 and not (sticky_ok and st.st_mode & stat.S_ISVTX)
    if st.st_uid not in (0, os.geteuid()) or shared:
        os.close(fd)
        raise CircusError("%s %s: its folder %s is %s, so another user could replace the socket: "
                          "use a folder only root or the daemon's user can write (or leave the "
                          "endpoint out for a private one)" % (what, endpoint, folder,
                          "writable by others (mode %o)" % (st.st_mode & 0o7777)
                          if st.st_uid in (0, os.geteuid()) else "owned by uid %d" % st.st_uid))
    return fd


def _give_socket(dir_fd: int, name: str, owner, endpoint: str) -> None:
    """chown the socket we just bound to endpoint_owner (or a (user, group)): by folder fd,
    never through a link."""
    import stat
    uid, gid, _ = resolve_user(*owner) if isinstance(owner, tuple) else resolve_user(owner, None)
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, "it is no longer the socket the daemon made")
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    except (OSError, ValueError) as e:
        _log().warning("endpoint_owner: cannot give %s to %s: %s", endpoint, owner,
                       getattr(e, "strerror", None) or e)


def _bind(sock, endpoint, what, curve=None, owner=None):
    """Bind a ZeroMQ socket; an ipc socket file is made 0600 (given to ``owner`` if set)."""
    import zmq
    abstract = endpoint.startswith("ipc://@")      # Linux's abstract namespace: no file
    path = endpoint[6:] if endpoint.startswith("ipc://") and not abstract else None
    dir_fd = None
    try:
        if curve is not None:
            curve.secure(sock, what.split()[0])
        if path:
            if os.path.dirname(path) == private_dir():
                ensure_private_dir(os.path.dirname(path))
            # a socket given to endpoint_owner in a shared folder: the owner could replace it
            dir_fd = _ipc_folder(path, what, endpoint, sticky_ok=owner is None)
            if _ipc_in_use(path):
                raise CircusError("%s %s: a daemon is already running there (stop it, or give "
                                  "this one another endpoint)" % (what, endpoint))
        old_umask = os.umask(0o177) if path else None   # born 0600: no chmod by name after
        try:
            sock.bind(endpoint)
        finally:
            if path:
                os.umask(old_umask)
        if path and owner is not None:
            _give_socket(dir_fd, os.path.basename(path), owner, endpoint)
    except zmq.ZMQError as e:
        sock.close(0)
        hint = " (is another daemon running on it?)" if e.errno == errno.EADDRINUSE else ""
        raise CircusError("%s %s: cannot bind: %s%s" % (what, endpoint, e.strerror, hint)) from None
    except BaseException:
        sock.close(0)
        raise
    finally:
        if dir_fd is not None:
            os.close(dir_fd)


def _unlink_ipc(endpoint) -> None:
    """Remove a closed channel's ipc socket file: one left behind reads as a daemon
    that died (libzmq's own removal may not run before the process exits)."""
    if endpoint and endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        try:
            os.unlink(endpoint[6:])
        except OSError:
            pass


def check_endpoint(endpoint: str, what: str, allow_insecure=False, curve=False) -> None:
    """Without CurveZMQ, TCP control is open to every local user: say so; off this host, refuse."""
    try:
        zmq_endpoint(endpoint or "")        # the config checked it; Arbiter(...) users too
    except ValueError as e:
        raise CircusError("%s: %s" % (what, e)) from None
    m = re.match(r"^tcp://(\[[^\]]*\]|[^:/]*):", endpoint or "")
    if not m or curve:
        return
    host = m.group(1).strip("[]")
    if is_loopback(host):
        _log().warning("%s %s: any local user can connect to it (ipc:// in a private folder is "
                       "safer: leave the endpoint out of [circus], or enable curve_secret_key)",
                       what, endpoint)
    elif not allow_insecure:
        raise CircusError("%s %s is reachable from other hosts and has no authentication: enable "
                          "CurveZMQ (curve_secret_key and curve_authorized_keys in [circus], keys "
                          "from `python circus.py ctl keygen`), or use 127.0.0.1 or ipc://, or set "
                          "allow_insecure_endpoint = true if you really mean it (anyone who "
                          "reaches it can run any command)" % (what, endpoint))
    else:
        _log().warning("%s %s: open to the network without authentication "
                       "(allow_insecure_endpoint = true)", what, endpoint)


# -- CurveZMQ: the daemon's authenticator (the key files: in the pure helpers) ---------


class CurveServer:
    """CurveZMQ for every channel: one key pair, a ZAP handler that admits listed clients.

    The client list is re-read when its folder changes, so adding or
    removing a client's .key file takes effect without a restart. A refused
    client gets no answer (the handshake fails); each unknown key is logged
    once.
    """

    MAX_REMEMBERED = 1024       # unknown keys logged so far: bounded against key-spraying

    def __init__(self, secret_key_file, location, ctx, owner_location=None):
        import zmq
        self.public, self.secret = load_curve_key(secret_key_file, secret=True)
        if os.stat(secret_key_file).st_mode & 0o077:
            _log().warning("curve_secret_key %s is readable by other users: anyone who reads it "
                           "can pose as this daemon (chmod 600 it)", secret_key_file)
        self.location, self.owner_location = location, owner_location
        self._stamps: dict = {}     # location -> (its files' stamp, its keys)
        self._refused: set = set()
        self.allowed()          # read now, before any privilege drop
        self.owner_keys()
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("inproc://zeromq.zap.01")     # libzmq asks this address (ZAP, RFC 27)
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def secure(self, sock, domain: str) -> None:
        """Make ``sock`` a CURVE server (call before bind)."""
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.zap_domain = domain.encode()

    def _keys(self, location) -> set:
        """The keys of a location, re-read whenever a key file appears, goes or changes."""
        stamp = []
        try:
            for path in _key_files(location):
                st = os.stat(path)
                stamp.append((path, st.st_mtime_ns, st.st_size))
        except OSError:
            stamp = None        # changing under our feet: read it all again next time
        old = self._stamps.get(location)
        if stamp is None or old is None or stamp != old[0]:
            problems: list = []
            old = self._stamps[location] = (stamp, authorized_keys(location, problems))
            for p in problems:
                _log().warning("%s: %s (skipped)", location, p)
        return old[1]

    def allowed(self) -> set:
        """curve_authorized_keys: clients with every right."""
        return self._keys(self.location)

    def owner_keys(self) -> set:
        """curve_owner_keys: clients with endpoint_owner's rights only (see check_peer)."""
        return self._keys(self.owner_location) if self.owner_location else set()

    def decide(self, frames) -> tuple:
        """A ZAP request -> (status code, text, user id)."""
        from zmq.utils import z85
        if len(frames) < 7 or frames[0] != b"1.0":
            return b"500", b"bad ZAP request", b""
        domain, address, mechanism = frames[2], frames[3], frames[5]
        if mechanism != b"CURVE" or len(frames[6]) != 32:
            return b"400", b"CURVE only", b""
        key = z85.encode(frames[6])
        if key in self.allowed() or key in self.owner_keys():
            return b"200", b"OK", key
        if key not in self._refused and len(self._refused) < self.MAX_REMEMBERED:
            self._refused.add(key)
            _log().warning("%s channel: refused CURVE key %s from %s (not in curve_authorized_keys; "
                           "add its .key file there to let it in)", domain.decode(errors="replace"),
                           key.decode(), address.decode(errors="replace") or "a local socket")
        return b"400", b"unknown key", b""

    async def _serve(self):
        while True:
            try:
                frames = await self.sock.recv_multipart()
            except Exception:       # closed
                return
            try:
                code, text, user = self.decide(frames)
            except Exception:   # a bug of ours must deny, not end authentication
                _log().exception("CurveZMQ: refused a client after an internal error")
                code, text, user = b"500", b"internal error", b""
            req_id = frames[1] if len(frames) > 1 else b""
            await self.sock.send_multipart([b"1.0", req_id, code, text, user, b""])

    def owns(self, task):
        return False

    async def close(self):
        self._task.cancel()
        self.sock.close(0)


class ControlChannel:
    """ROUTER socket answering Circus's JSON commands.

    Accepts DEALER clients (one frame, as circusctl sends) and also REQ
    clients (empty delimiter frame), which Circus silently drops.
    """

    MAX_REQUEST = 1 << 20       # bytes in one message, all its frames together
    MAX_FRAMES = 3              # the routing id, REQ's empty delimiter, the request

    def __init__(self, arbiter, endpoint, ctx, curve=None):
        self.arbiter = arbiter
        self.endpoint = endpoint
        self.ctx = ctx
        self.curve = curve
        self.sock = None
        self._frames = None     # the same socket, blocking API: the rest of a message is here already
        self._task = None
        self._inflight: set = set()

    async def start(self):
        import zmq
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.MAX_REQUEST)     # per frame: libzmq has no more
        # the owner, and only the owner (and root), may connect
        _bind(self.sock, self.endpoint, "control endpoint", self.curve, self.arbiter.endpoint_owner)
        self._frames = zmq.Socket.shadow(self.sock.underlying)
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def owns(self, task) -> bool:
        return task in self._inflight

    async def _recv(self):
        """(frames as bytes, or None when over MAX_FRAMES or MAX_REQUEST; count; bytes;
        the last frame, whose properties name the sender).

        ZeroMQ hands a message over whole, so once its first frame is here the
        rest is too: it is taken frame by frame without copying, and what is
        over the budget is let go at once instead of gathered.
        """
        import zmq
        frame = await self.sock.recv(copy=False)
        frames, count, size = [], 0, 0
        while True:
            count += 1
            size += len(frame)
            if frames is not None and count <= self.MAX_FRAMES and size <= self.MAX_REQUEST:
                frames.append(frame.bytes)
            else:
                frames = None
            if not frame.more:
                return frames, count, size, frame
            if count % 4096 == 0:
                await asyncio.sleep(0)      # a huge message: the loop keeps running meanwhile
            frame = self._frames.recv(zmq.NOBLOCK, copy=False)

    async def _serve(self):
        import zmq
        loop = asyncio.get_running_loop()
        while True:
            try:
                frames, count, size, last = await self._recv()
            except zmq.ZMQError as e:
                if self.sock is None or self.sock.closed:
                    return
                _log().warning("control channel: %s", e)
                continue
            if frames is None:
                _log().warning("control channel: dropped a message of %d frames, %d bytes, unread (a "
                               "request is one frame; at most %d bytes)", count, size, self.MAX_REQUEST)
                continue
            peer = self._peer(last)
            if len(frames) == 2:
                envelope, body = frames[:1], frames[1]
            elif len(frames) == 3 and frames[1] == b"":
                envelope, body = frames[:2], frames[2]
            else:
                _log().warning("control channel: ignored a %d-frame message (send one JSON frame)",
                               len(frames))
                continue
            task = loop.create_task(self._handle(envelope, body, peer))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _peer(self, frame):
        """The sender, when not root nor the daemon's user: a Peer (see check_peer), else None.

        On ipc, libzmq appends the SO_PEERCRED uid:gid:pid to the Peer-Address property."""
        owner = self.arbiter.endpoint_owner
        if not self.endpoint.startswith("ipc://"):
            if owner is None or self.curve is None:
                return None
            try:        # CurveZMQ: the ZAP handler made the client's key its User-Id
                key = frame.get("User-Id").encode()
            except Exception:
                return None
            if key not in self.curve.owner_keys():
                return None
            try:
                return Peer(*resolve_user(owner, None)[:2])
            except ValueError:
                return Peer(-1, -1)
        try:
            _, uid, gid, _ = frame.get("Peer-Address").rsplit(":", 3)
            uid, gid = int(uid), int(gid)
        except Exception:       # no credentials: with an endpoint_owner, trust no more than it
            return Peer(-1, -1) if owner is not None else None
        return None if uid in (0, os.geteuid()) else Peer(uid, gid)

    async def _handle(self, envelope, body, peer=None):
        reply = await dispatch(self.arbiter, body, peer)
        if reply is None or self.sock is None:
            return
        try:
            await self.sock.send_multipart(envelope + [json.dumps(reply).encode()])
        except Exception as e:  # client gone, socket closing
            _log().debug("control reply not sent: %s", e)

    async def close(self):
        if self._task is not None:      # no new requests; those in flight may finish
            self._task.cancel()
        me = asyncio.current_task()
        pending = [t for t in self._inflight if t is not me]
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        if self.sock is not None:
            self.sock.close(linger=100)
            self.sock = self._frames = None
            _unlink_ipc(self.endpoint)


class _XPubChannel:
    """An XPUB socket (a PUB that hears subscriptions): knows who listens to what."""

    def __init__(self, endpoint, ctx, what, curve=None):
        import zmq
        self.endpoint = endpoint
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        _bind(self.sock, endpoint, what, curve)
        self._noblock = zmq.NOBLOCK
        self._again = zmq.Again
        self.prefixes: set = set()      # topics someone subscribed to
        self._task = asyncio.get_event_loop().create_task(self._hear())

    async def _hear(self):
        while self.sock is not None:
            try:
                msg = await self.sock.recv()
            except Exception:       # closed
                return
            if msg[:1] == b"\x01":
                self.prefixes.add(msg[1:])
                self.subscribed()
            elif msg[:1] == b"\x00":
                self.prefixes.discard(msg[1:])

    def subscribed(self):
        """Called after each new subscription."""

    def send(self, topic: str, payload) -> None:
        if self.sock is None:
            return
        try:
            self.sock.send_multipart([topic.encode(), json.dumps(payload).encode()], self._noblock)
        except self._again:     # a slow subscriber drops messages, never blocks us
            pass

    def owns(self, task):
        return False

    async def close(self):
        if self.sock is not None:
            sock, self.sock = self.sock, None
            self._task.cancel()
            sock.close(linger=100)
            _unlink_ipc(self.endpoint)


class PubChannel(_XPubChannel):
    """The event channel: each event as two frames, ``watcher.NAME.EVENT`` + JSON.

    Hearing subscriptions lets the daemon publish process output
    (``output.NAME.stdout``) and its log (``log``) only while someone
    follows them (`ctl tail -f`, `ctl maintail -f`): no cost otherwise.
    """

    def __init__(self, endpoint, ctx, curve=None):
        super().__init__(endpoint, ctx, "pubsub endpoint", curve)

    def wants(self, topic: bytes) -> bool:
        return any(topic.startswith(p) for p in self.prefixes)

    __call__ = _XPubChannel.send


class StatsChannel(_XPubChannel):
    """The stats channel (``stats_endpoint``), as circusd-stats publishes it.

    Every second ``stat.<watcher>.<pid>``, ``stat.<watcher>`` and
    ``stat.circus`` records, but only while somebody is subscribed: no
    subscriber, no sampling.
    """

    def __init__(self, arbiter, endpoint, ctx, curve=None):
        super().__init__(endpoint, ctx, "stats endpoint", curve)
        self.arbiter = arbiter
        self.cache: dict = {}
        self._pub = None

    def subscribed(self):
        if self._pub is None or self._pub.done():
            self._pub = asyncio.get_event_loop().create_task(self._publish())

    async def _publish(self):
        loop = asyncio.get_event_loop()
        while self.prefixes and self.sock is not None:
            watchers = [(w.topic_name, [(pid, p.started) for pid, p in w.processes.items()])
                        for w in self.arbiter.watchers]
            records = await loop.run_in_executor(None, _stats_records, watchers, self.cache)
            for topic, payload in records:
                self.send(topic, payload)
            await asyncio.sleep(1.0)

    async def close(self):
        if self._pub is not None:
            self._pub.cancel()
        await super().close()


class MulticastChannel:
    """Answers any datagram on the multicast group with the control endpoint."""

    def __init__(self, arbiter, endpoint):
        self.arbiter, self.endpoint, self.transport = arbiter, endpoint, None

    async def start(self):
        import socket
        import struct
        from urllib.parse import urlparse
        u = urlparse(self.endpoint)
        group, port = u.hostname, u.port or 12027
        if not group or not 224 <= int(group.split(".")[0]) <= 239:
            _log().warning("multicast_endpoint %s is not a multicast group (224-239.x): "
                           "discovery off", self.endpoint)
            return
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        mreq = struct.pack("4sl", socket.inet_aton(group), socket.INADDR_ANY)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        answer = json.dumps({"endpoint": self.arbiter.endpoint}).encode()

        class Proto(asyncio.DatagramProtocol):
            def connection_made(self, transport):
                self.transport = transport

            def datagram_received(self, data, addr):
                self.transport.sendto(answer, addr)
        self.transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(Proto, sock=s)

    def owns(self, task):
        return False

    async def close(self):
        if self.transport is not None:
            self.transport.close()
            self.transport = None


# ---------------------------------------------------------------------------
# 16. Client and ctl
# ---------------------------------------------------------------------------

class CallError(CircusError):
    """The daemon did not answer in time, or could not be reached."""


class NoDaemonError(CallError):
    """Nothing listens on an ipc endpoint: known at once, no timeout to wait for."""


class NoAccessError(CallError):
    """An ipc socket this user may not connect to: known at once too."""


def _check_ipc_listener(endpoint: str) -> None:
    """NoDaemonError when an ipc:// endpoint has no socket file or refuses connections
    (a daemon that was killed); anything else is left to ZeroMQ."""
    if not endpoint.startswith("ipc://"):
        return
    import socket
    path = endpoint[6:]
    why = None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect("\0" + path[1:] if path.startswith("@") else path)
        except FileNotFoundError:
            why = "no socket file"
        except ConnectionRefusedError:
            why = "its socket file is left over: nothing listens on it"
        except PermissionError:     # known at once too: no use waiting for a timeout
            raise NoAccessError("cannot connect to %s: permission denied (its socket is only for the "
                            "daemon's user and endpoint_owner): run ctl as one of them" % endpoint) from None
        except OSError:
            pass
    if why:
        raise NoDaemonError("no daemon is running on %s (%s); start it, or point --endpoint or "
                            "$CIRCUSCTL_ENDPOINT at a running one" % (endpoint, why))


def check_ipc_server(endpoint: str) -> None:
    """Before a client talks to an ipc socket: refuse one another user could have planted.

    Its folder must be root's or ours and not writable by others (a sticky folder like /tmp
    is allowed, but then the socket must already be there and be root's or ours)."""
    import stat
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return
    path = endpoint[6:]
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return          # nothing there: the request times out, as for any absent daemon
    fd = _ipc_folder(path, "endpoint", endpoint)
    try:
        shared = os.fstat(fd).st_mode & 0o022
        try:
            st = os.stat(os.path.basename(path), dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            if shared:
                raise CallError("endpoint %s: no socket there yet, and its folder is shared "
                                "with other users: start the daemon first" % endpoint) from None
            return
        if st.st_uid not in (0, os.geteuid()) and (shared or os.geteuid() != 0) \
                or not stat.S_ISSOCK(st.st_mode):
            raise CircusError("endpoint %s: the socket belongs to uid %d, not to you or root: "
                              "another user may have put it there, so nothing is sent to it "
                              "(remove it and restart the daemon)" % (endpoint, st.st_uid))
    finally:
        os.close(fd)


class Client:
    """Talks to a running daemon (ours or circusd) over its control endpoint.

    ::

        with Client("tcp://127.0.0.1:5555") as c:
            print(c.call("status"))             # {"status": "ok", "statuses": {...}}
            c.cast("incr", name="web")          # fire and forget
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 5.0, curve=None):
        import zmq
        check_ipc_server(endpoint)     # never talk to a socket another user planted
        _check_ipc_listener(endpoint)
        self._zmq = zmq
        self.endpoint = endpoint
        self.timeout = timeout
        self.curve = curve
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, os.urandom(16).hex().encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        _curve_client(self.sock, curve)
        self.sock.connect(endpoint)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Close the socket and its context."""
        self.sock.close(0)
        self.ctx.term()

    def send(self, message: dict) -> dict | None:
        """Send a raw message dict; returns the reply (None for casts)."""
        zmq = self._zmq
        msg_id = message.setdefault("id", os.urandom(16).hex())
        self.sock.send(json.dumps(message).encode())
        if message.get("msg_type") == "cast":
            return None
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(left * 1000, zmq.POLLIN):
                raise CallError("Timed out.")
            reply = json.loads(self.sock.recv())
            if reply.get("id") == msg_id:
                return reply

    def call(self, command: str, **props) -> dict:
        """Send a command and wait for its reply."""
        return self.send({"command": command, "properties": props})

    def cast(self, command: str, **props) -> None:
        """Send a command without waiting (no reply comes back)."""
        self.send({"command": command, "properties": props, "msg_type": "cast"})

    def subscribe(self, topics=("watcher.",), timeout: float | None = None,
                  pubsub_endpoint: str | None = None) -> object:
        """Yield ``(topic, payload)`` events; the daemon is asked for its pub/sub endpoint.

        ``timeout``: stop after that many seconds without an event (None: never).
        The client's CurveZMQ keys are used for the subscription too.
        """
        if pubsub_endpoint is None:
            reply = self.call("globaloptions", option="pubsub_endpoint")
            if reply.get("status") != "ok":
                raise CallError("cannot find the pub/sub endpoint: %s" % reply.get("reason"))
            pubsub_endpoint = _reachable(reply["options"]["pubsub_endpoint"], self.endpoint)
        return subscribe(pubsub_endpoint, [t.encode() if isinstance(t, str) else t for t in topics],
                         timeout, curve=self.curve)


def key_dir() -> str:
    """Where `ctl keygen` writes and ctl looks for keys: ~/.config/circus."""
    return os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "circus")


def client_keys(key: str | None = None, server_key: str | None = None):
    """The (public, secret, server public) keys a client authenticates with, or None.

    Each file comes from the argument, else $CIRCUSCTL_KEY / $CIRCUSCTL_SERVER_KEY,
    else ``client.key_secret`` / ``server.key`` in key_dir() when both exist.
    """
    key = key or os.environ.get("CIRCUSCTL_KEY")
    server_key = server_key or os.environ.get("CIRCUSCTL_SERVER_KEY")
    if not key and not server_key:
        key, server_key = (os.path.join(key_dir(), f) for f in ("client.key_secret", "server.key"))
        if not (os.path.exists(key) and os.path.exists(server_key)):
            return None
    if not key or not server_key:
        raise CircusError("CurveZMQ needs both the client's secret key (--key, $CIRCUSCTL_KEY) and "
                          "the daemon's public key (--server-key, $CIRCUSCTL_SERVER_KEY)")
    public, secret = load_curve_key(key, secret=True)
    return public, secret, load_curve_key(server_key)[0]


def _curve_client(sock, curve) -> None:
    if curve:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = curve


def keygen(directory: str, name: str) -> tuple:
    """Write NAME.key (public) and NAME.key_secret (0600) into ``directory``, in the
    format of zmq.auth's certificates; never over an existing file or through a symlink."""
    import zmq
    os.makedirs(directory, mode=0o700, exist_ok=True)
    public, secret = (k.decode() for k in zmq.curve_keypair())
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    paths = tuple(os.path.join(directory, name + ext) for ext in (".key", ".key_secret"))
    for p in paths:
        if os.path.lexists(p):
            raise CircusError("%s already exists: remove it first, or pick another name" % p)
    bodies = (
        (paths[0], 0o644, "#   ZeroMQ CURVE Public Certificate, by circus.py ctl keygen, %s\n"
                          "#   Give this one to the other side.\n\nmetadata\ncurve\n"
                          "    public-key = \"%s\"\n" % (stamp, public)),
        (paths[1], 0o600, "#   ZeroMQ CURVE **Secret** Certificate, by circus.py ctl keygen, %s\n"
                          "#   Keep it private: never copy it or make it readable by others.\n\n"
                          "metadata\ncurve\n    public-key = \"%s\"\n    secret-key = \"%s\"\n"
                          % (stamp, public, secret)))
    for path, mode, text in bodies:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(path, mode)        # whatever the umask
    return paths


def _reachable(endpoint: str, via: str) -> str:
    """A bind address (``tcp://*:5556``) made connectable: the host we reached control on."""
    host = re.match(r"^tcp://([^:/]+|\[[^\]]+\]):", via)
    return re.sub(r"^tcp://(\*|0\.0\.0\.0|\[::\])(?=:)",
                  "tcp://" + (host.group(1) if host else "127.0.0.1"), endpoint)


def subscribe(endpoint: str = DEFAULT_PUBSUB, topics=(b"",), timeout=None, raw=False,
              curve=None) -> object:
    """Yield ``(topic, payload)`` events from a pub/sub endpoint, forever or until timeout.

    With ``raw`` the two frames are yielded as they came (bytes, bytes);
    ``curve`` is a ``client_keys()`` triple for a daemon with CurveZMQ on.
    """
    import zmq
    check_ipc_server(endpoint)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    _curve_client(sock, curve)
    for t in topics:
        sock.setsockopt(zmq.SUBSCRIBE, t if isinstance(t, bytes) else t.encode())
    sock.connect(endpoint)
    try:
        while True:
            if timeout is not None and not sock.poll(timeout * 1000):
                return
            frames = sock.recv_multipart()
            if len(frames) == 2 and raw:
                yield frames[0], frames[1]
            elif len(frames) == 2:
                try:
                    yield frames[0].decode(), json.loads(frames[1])
                except ValueError:
                    continue
    finally:
        sock.close(0)
        ctx.term()


# -- ctl argument parsing, from the command table's usage strings ----------------

class UsageError(CircusError):
    """Bad ctl arguments; exit code 1 (argument count) or 2 (unknown words)."""

    def __init__(self, text, code=1):
        super().__init__(text)
        self.code = code


_INT_PROPS = {"nb", "pid", "process", "childpid"}
_SET_KEYS = COMMANDS["set"].settable


def _set_value(key, value):
    if key not in _SET_KEYS and not key.startswith(("stdout_stream.", "stderr_stream.", "rlimit_")):
        raise UsageError("unknown key %r" % key)
    try:
        return convert_value(set_value_kind(key), value)      # as circusctl sends it
    except ValueError as e:
        raise UsageError("set %s: %s" % (key, e)) from None


_REST = ("...", "+", "...]")       # a usage word taking all the words left


def build_request(name: str, words: list) -> dict:
    """ctl words -> a request dict, following the command's usage string."""
    cmd = COMMANDS[name]
    flags, positional = _ctl_flags(cmd, words)
    props = _positional_props(cmd, positional)
    for s in cmd.usage.split():
        if not s.strip("[]").startswith("--"):
            continue
        key, eq, default = s.strip("[]")[2:].partition("=")
        if key in flags:
            props[key] = flags[key]
        elif default:
            props[key] = default
    if "[--terminate]" in cmd.usage.split():    # reload: graceful unless --terminate
        props["graceful"] = not props.pop("terminate", False)
    return {"command": name, "properties": props}


def _ctl_flags(cmd, words) -> tuple:
    """The --flags of ``words`` (each one the usage names) and the other words."""
    flags, positional = {}, []
    for w in words:
        if not (w.startswith("--") and len(w) > 2):
            positional.append(w)
            continue
        key, _, val = w[2:].partition("=")
        key = key.replace("-", "_")
        known = [s for s in cmd.usage.split() if s.strip("[]").startswith("--" + key)]
        if not known:
            raise UsageError("%s: unknown option %s (usage: ctl %s %s)"
                             % (cmd.name, w, cmd.name, cmd.usage), 2)
        flags[key] = val if "=" in known[0] else True
    return flags, positional


def _positional_props(cmd, positional) -> dict:
    """The usage's positional words filled from ``positional``, counted as circusctl does."""
    spec = [s for s in cmd.usage.split() if not s.strip("[]").startswith("--")]
    required = [s for s in spec if not s.startswith("[")]
    rest = any(s.endswith(_REST) for s in spec)
    if cmd.extra_ignored and not rest:
        positional = positional[:len(spec)]
    extra = len(positional) - len(required)
    if extra < 0 or (extra > len(spec) - len(required) and not rest):
        raise UsageError(cmd.argcount)
    props: dict = {}
    it = iter(positional)
    for s in spec:
        key = s.strip("[]").rstrip(".+")
        if s.endswith(_REST):
            _rest_prop(props, key, list(it), s.startswith("["))
            continue
        if s.startswith("["):
            if extra <= 0:
                continue
            extra -= 1
        props[key] = _number_prop(cmd.name, key, next(it))
    return props


def _rest_prop(props, key, vals, optional) -> None:
    if key == "options":                # set: KEY VALUE pairs, converted as circusctl does
        if len(vals) % 2 or not vals:
            raise UsageError("Invalid number of arguments")
        props["options"] = {vals[i].lower(): _set_value(vals[i].lower(), vals[i + 1])
                            for i in range(0, len(vals), 2)}
    elif key == "cmd":
        props[key] = " ".join(vals)
    elif vals or not optional:
        props[key] = vals


def _number_prop(name, key, val):
    if key not in _INT_PROPS:
        return val
    try:
        return int(val)
    except ValueError:
        raise UsageError("%s: %s must be a number, not %r" % (name, key, val)) from None


def _ctl_usage() -> str:
    lines = ["usage: python circus.py ctl [--endpoint E] [--timeout S] [--json] [--prettify] "
             "[--key F --server-key F] COMMAND [ARGS]", "", "commands:"]
    for name in sorted(COMMANDS):
        lines.append("  %-14s %s" % (name, COMMANDS[name].help.splitlines()[0]))
    lines.append("  %-14s %s" % ("keygen", "Write a CurveZMQ key pair: keygen [DIR] [NAME] (no daemon "
                                           "needed)"))
    lines.append("")
    lines.append("endpoint: --endpoint, else $CIRCUSCTL_ENDPOINT, else %s if it exists, else %s"
                 % (default_endpoint("control"), DEFAULT_ENDPOINT))
    lines.append("CurveZMQ: --key (client.key_secret) and --server-key (the daemon's .key), else "
                 "$CIRCUSCTL_KEY and $CIRCUSCTL_SERVER_KEY, else both files in %s" % key_dir())
    return "\n".join(lines)


def _command_help(name) -> str:
    cmd = COMMANDS[name]
    words = " ".join(w if w.strip("[").startswith("--") else w.upper() for w in cmd.usage.split())
    return "usage: python circus.py ctl %s %s\n\n%s" % (name, words, cmd.help)


def _listen(endpoint, topics, out, curve):
    for topic, body in subscribe(endpoint, [t.encode() for t in topics] or [b""], raw=True, curve=curve):
        out.write("%r: %r\n" % (topic, body))      # circusctl prints the bytes reprs
        out.flush()


def _pubsub_of(endpoint, timeout, curve) -> str:
    """The pub/sub endpoint of the daemon controlled on ``endpoint``, as ``tail -f`` finds it.
    One that does not answer as control is taken as a pub/sub endpoint itself (circusctl's
    ``--endpoint`` for listen); NoDaemonError when nothing listens there at all."""
    try:
        with Client(endpoint, min(timeout, 2.0), curve) as client:
            reply = client.call("globaloptions", option="pubsub_endpoint")
    except NoDaemonError:
        raise
    except CallError:
        return endpoint
    if reply.get("status") != "ok" or not (reply.get("options") or {}).get("pubsub_endpoint"):
        raise CircusError("cannot find the pub/sub endpoint: %s" % reply.get("reason", "none set"))
    return _reachable(reply["options"]["pubsub_endpoint"], endpoint)


def _default_ctl_endpoint(kind="control") -> str:
    """Where a daemon started with no endpoint listens (our private ipc socket), else
    Circus's TCP default (a real circusd)."""
    import stat
    ipc = default_endpoint(kind)
    try:        # a private folder that is not ours: never fall back to TCP, refuse (Client)
        st = os.lstat(private_dir())
        planted = not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077
    except OSError:
        planted = False
    if planted or os.path.exists(ipc[6:]):
        return ipc
    return DEFAULT_ENDPOINT if kind == "control" else DEFAULT_PUBSUB


def _ctl_parser():
    """ctl's global options, before the command; its errors are one line of ours (exit 2),
    never argparse's usage and exit."""
    import argparse

    def seconds(text):
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError("--timeout takes seconds, not %r" % text) from None
    p = argparse.ArgumentParser(prog="python circus.py ctl", add_help=False, allow_abbrev=False,
                                exit_on_error=False)
    p.add_argument("--endpoint", default=os.environ.get("CIRCUSCTL_ENDPOINT") or None)
    p.add_argument("--timeout", type=seconds, default=5.0)
    p.add_argument("--key")
    p.add_argument("--server-key")
    p.add_argument("--json", action="store_true")
    p.add_argument("--prettify", action="store_true")
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--version", action="store_true")
    p.add_argument("words", nargs=argparse.REMAINDER)      # the command and its words
    return p


def _ctl_options(argv):
    """ctl's global options (before the command) -> (namespace, None), or (None, error line)."""
    import argparse
    try:
        g, unknown = _ctl_parser().parse_known_args(argv)
    except argparse.ArgumentError as e:
        if e.message == "expected one argument":
            return None, "%s needs a value" % e.argument_name
        return None, e.message
    if unknown:
        return None, "unknown option %s (see: python circus.py ctl --help)" % unknown[0]
    return g, None


def ctl_main(argv) -> int:
    """``ctl``: the circusctl clone. Returns the exit code."""
    g, error = _ctl_options(argv)
    if error:
        sys.stderr.write("error: %s\n" % error)
        return 2
    if g.help or g.version:
        return _ctl_about(g)
    words = g.words
    if words and words[0] == "keygen":
        return _ctl_keygen(words[1:])
    try:
        g.curve = client_keys(g.key, g.server_key)
    except CircusError as e:
        sys.stderr.write("error: %s\n" % e)
        return 2
    if not words:
        return _shell(g)
    name, words = words[0].lower(), words[1:]
    for flag in ("json", "prettify"):       # also accepted after the command (ctl stats --json)
        if "--" + flag in words:
            setattr(g, flag, True)
            words = [w for w in words if w != "--" + flag]
    if name not in COMMANDS:
        sys.stderr.write("error: unknown command %r (see: python circus.py ctl help)\n" % name)
        return 2
    if "--help" in words or "-h" in words:
        return _ctl_help(name, words, g)
    return (COMMANDS[name].client or _ctl_request)(name, words, g)


def _ctl_about(g) -> int:
    """``--help [COMMAND]`` and ``--version``."""
    if g.help:
        topic = g.words[0] if g.words and g.words[0] in COMMANDS else None
        sys.stdout.write((_command_help(topic) if topic else _ctl_usage()) + "\n")
    else:
        sys.stdout.write("circus.py %s (circusctl %s compatible)\n" % (__version__, CIRCUS_COMPAT))
    return 0


def ctl_runner(*names):
    """Register what ctl runs for these commands instead of one request and its reply:
    ``func(name, words, options)`` returns the exit code."""
    def deco(func):
        for name in names:
            COMMANDS[name].client = func
        return func
    return deco


def _control(g) -> str:
    """The control endpoint ctl talks to."""
    return g.endpoint or _default_ctl_endpoint()


def _ctl_request(name, words, g) -> int:
    """One request built from the words, its reply printed as circusctl prints it."""
    try:
        request = build_request(name, words)
    except UsageError as e:
        sys.stderr.write("%s\n" % e)
        return e.code
    endpoint = g.endpoint
    try:
        endpoint = _control(g)
        with Client(endpoint, g.timeout, g.curve) as client:
            reply = client.send(request)
    except CallError as e:
        return _ctl_unreachable(e, endpoint, g.curve)
    except Exception as e:          # e.g. a malformed endpoint
        sys.stderr.write("error: %s\n" % e)
        return 1
    if g.json:
        text = json.dumps(reply, indent=2, sort_keys=True) if g.prettify else json.dumps(reply)
        sys.stdout.write(text + "\n")
        return 0
    cmd = COMMANDS[name]
    if reply.get("status") == "error":
        sys.stderr.write("%s\n" % cmd.fmt_error(reply))
        return 3
    sys.stdout.write(cmd.fmt(reply) + "\n")
    return cmd.exit_code(reply)


@ctl_runner("help")
def _ctl_help(name, words, g) -> int:
    """``help [COMMAND]`` and ``COMMAND --help``."""
    topic = words[0] if name == "help" and words else (name if name != "help" else None)
    if topic and topic not in COMMANDS:
        sys.stderr.write("error: unknown command %r\n" % topic)
        return 2
    sys.stdout.write((_command_help(topic) if topic else _ctl_usage()) + "\n")
    return 0


@ctl_runner("listen")
def _ctl_listen(name, words, g) -> int:
    """``listen [TOPIC...]``: the daemon's events, until Ctrl-C."""
    endpoint, curve = g.endpoint, g.curve
    try:
        pubsub = _pubsub_of(endpoint, g.timeout, curve) if endpoint else _default_ctl_endpoint("pubsub")
        _listen(pubsub, words, sys.stdout, curve)
    except CallError as e:
        return _ctl_unreachable(e, endpoint, curve)
    except CircusError as e:
        sys.stderr.write("error: %s\n" % e)
        return 3
    except KeyboardInterrupt:
        pass
    return 0


def _ctl_unreachable(e, endpoint, curve=None) -> int:
    """No answer: exit 3 at once when no daemon runs there, else 1 after the timeout."""
    if isinstance(e, NoDaemonError):
        sys.stderr.write("error: %s\n" % e)
        return 3
    if isinstance(e, NoAccessError):
        sys.stderr.write("error: %s\n" % e)
        return 1
    sys.stderr.write("%s\nIs the daemon running on %s? (set --endpoint or $CIRCUSCTL_ENDPOINT)%s\n"
                     % (e, endpoint, _curve_hint(curve)))
    return 1


def _curve_hint(curve) -> str:
    """A timeout with CurveZMQ on is most often a key the daemon does not know."""
    if not curve:
        return ""
    return ("\nCurveZMQ is on (client key %s): is this key's .key file in the daemon's "
            "curve_authorized_keys, and is --server-key the daemon's public key?" % curve[0].decode())


def _ctl_keygen(args) -> int:
    """``keygen [DIR] [NAME]``: a key pair for a daemon or a client (default: the client's)."""
    if len(args) > 2 or any(a.startswith("-") for a in args):
        sys.stderr.write("usage: python circus.py ctl keygen [DIR] [NAME]   (default: %s client)\n"
                         % key_dir())
        return 2
    directory = args[0] if args else key_dir()
    name = args[1] if len(args) > 1 else "client"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        sys.stderr.write("error: key name %r: use letters, digits, '_', '-' and '.'\n" % name)
        return 2
    try:
        public, secret = keygen(directory, name)
    except (CircusError, OSError) as e:
        sys.stderr.write("error: %s\n" % e)
        return 1
    sys.stdout.write("public key: %s\nsecret key: %s (mode 0600: keep it private)\n" % (public, secret))
    return 0


@ctl_runner("tail", "maintail")
def _ctl_tail(name, args, g) -> int:
    """``tail [-f] [-BYTES] NAME [stdout|stderr]`` and ``maintail [-f] [-BYTES]``."""
    out, err = sys.stdout, sys.stderr
    endpoint, timeout, curve = _control(g), g.timeout, g.curve
    try:
        follow, props = _tail_props(name, args)
    except UsageError as e:
        err.write("%s\n" % e)
        return e.code
    try:
        with Client(endpoint, timeout, curve) as client:
            sub = None
            if follow:
                pubsub = client.call("globaloptions", option="pubsub_endpoint")
                if pubsub.get("status") == "error":
                    err.write("error: %s\n" % pubsub.get("reason"))
                    return 3
                topic = "log" if name == "maintail" else "output.%s.%s" % (
                    props["name"].lower().replace(" ", "_"), props["stream"])
                sub = subscribe(_reachable(pubsub["options"]["pubsub_endpoint"], endpoint), [topic.encode()],
                                curve=curve)
            reply = client.call(name, **props)
    except CallError as e:
        return _ctl_unreachable(e, endpoint, curve)
    if reply.get("status") == "error":
        err.write("error: %s\n" % reply.get("reason"))
        return 3
    out.write(reply.get("data", ""))
    out.flush()
    if sub is None:
        return 0
    try:
        for _topic, payload in sub:
            out.write(payload.get("data", ""))
            out.flush()
    except KeyboardInterrupt:
        pass
    return 0


def _tail_props(name, args) -> tuple:
    """tail's and maintail's words -> (follow?, the request's properties)."""
    follow, nbytes, words = False, 1600, []
    for a in args:
        if a == "-f":
            follow = True
        elif re.fullmatch(r"-\d+", a):
            nbytes = int(a[1:])
        elif a.startswith("-"):
            raise UsageError("Error: bad argument %s" % a, 2)
        else:
            words.append(a)
    if (name == "tail" and not 1 <= len(words) <= 2) or (name == "maintail" and words):
        usage = "tail [-f] [-BYTES] NAME [stdout|stderr]" if name == "tail" else "maintail [-f] [-BYTES]"
        raise UsageError("usage: python circus.py ctl %s" % usage, 2)
    props = {"bytes": nbytes}
    if name == "tail":
        props["name"] = words[0]
        props["stream"] = words[1] if len(words) > 1 else "stdout"
    return follow, props


def _top_frame(client, sort) -> str:
    rows = client.call("status", long=True).get("processes", [])
    infos = client.call("stats").get("infos", {})
    table = []
    for r in rows:
        info = (infos.get(r["watcher"]) or {}).get(str(r["pid"])) if r["pid"] else None
        info = info if isinstance(info, dict) else {}
        cpu = info.get("cpu") if isinstance(info.get("cpu"), (int, float)) else 0.0
        mem = info.get("mem") if isinstance(info.get("mem"), (int, float)) else 0.0
        table.append((r["name"], r["pid"] or "-", r["state"], cpu, mem, info.get("mem_info1", "-"),
                      _uptime(r["uptime"]) if r["uptime"] is not None else "-", r.get("restarts", 0)))
    key = {"cpu": lambda t: -t[3], "mem": lambda t: -t[4], "name": lambda t: t[0],
           "state": lambda t: (t[2], t[0])}.get(sort, lambda t: -t[3])
    table.sort(key=key)
    lines = ["circus.py top: %d processes, sorted by %s  (c cpu, m memory, n name, s state, q quit)"
             % (len(table), sort), "",
             "%-32s %8s %-9s %6s %6s %9s %12s %8s" % ("NAME", "PID", "STATE", "CPU%", "MEM%", "RSS",
                                                        "AGE", "RESTARTS")]
    for t in table:
        lines.append("%-32s %8s %-9s %6.1f %6.2f %9s %12s %8d" % t)
    return "\n".join(lines)


@ctl_runner("top")
def _ctl_top(name, args, g) -> int:
    """``top [--sort=cpu|mem|name|state] [--interval=S]``: refreshes in place until q or Ctrl-C."""
    import select
    endpoint, timeout, curve = _control(g), g.timeout, g.curve
    sort, interval = "cpu", 1.0
    for a in args:
        key, _, val = a.partition("=")
        if key == "--sort" and val in ("cpu", "mem", "name", "state"):
            sort = val
        elif key == "--interval":
            try:
                interval = max(0.1, float(val))
            except ValueError:
                sys.stderr.write("error: --interval takes seconds\n")
                return 2
        else:
            sys.stderr.write("usage: python circus.py ctl top [--sort=cpu|mem|name|state] [--interval=S]\n")
            return 2
    out = sys.stdout
    stdin = sys.stdin
    tty_state = None

    def leave(signum, frame):       # TERM/HUP: restore the terminal on the way out
        raise KeyboardInterrupt
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, leave)
    if stdin.isatty():
        import termios
        import tty
        tty_state = termios.tcgetattr(stdin.fileno())
        tty.setcbreak(stdin.fileno())
    out.write("\033[?25l")              # hide the cursor while drawing
    try:
        with Client(endpoint, timeout, curve) as client:
            while True:
                frame = _top_frame(client, sort)
                out.write("\033[H\033[2J" + frame.replace("\n", "\r\n") + "\r\n")
                out.flush()
                deadline = time.monotonic() + interval
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    if not select.select([stdin], [], [], left)[0]:
                        break
                    ch = os.read(stdin.fileno(), 1).decode("latin-1").lower()
                    if ch in ("q", "\x03", ""):
                        return 0
                    if ch in "cmns":
                        sort = {"c": "cpu", "m": "mem", "n": "name", "s": "state"}[ch]
                        break
    except KeyboardInterrupt:
        return 0
    except CallError as e:
        return _ctl_unreachable(e, endpoint, curve)
    finally:
        out.write("\033[?25h")
        out.flush()
        if tty_state is not None:
            import termios
            termios.tcsetattr(stdin.fileno(), termios.TCSADRAIN, tty_state)


def _shell(g) -> int:
    """No command: a small interactive shell (EOF or 'quit-shell' leaves)."""
    import shlex
    out = sys.stdout
    out.write("circus.py %s ctl shell, talking to %s. 'help' lists commands; Ctrl-D leaves.\n"
              % (__version__, _control(g)))
    base = (["--endpoint", g.endpoint] if g.endpoint else []) + ["--timeout", str(g.timeout)]
    base += [w for flag, v in (("--key", g.key), ("--server-key", g.server_key)) if v for w in (flag, v)]
    ctl_main(base + ["status"])
    while True:
        try:
            line = input("(circus.py) ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        try:
            words = shlex.split(line)
        except ValueError as e:
            out.write("error: %s\n" % e)
            continue
        if words:
            ctl_main(base + words)


# ---------------------------------------------------------------------------
# 17. HTTP: a small asyncio server (for /metrics and the dashboard)
# ---------------------------------------------------------------------------
# One small HTTP/1.1 server on asyncio streams (one request per connection)
# serves /metrics (``metrics_endpoint``) and the dashboard (``httpd = true``,
# or `python circus.py web` beside a running daemon). The dashboard reads and
# acts through a hub: in the daemon, the command table itself; in `web`, a
# ZeroMQ client of the daemon (ours, or a real circusd).

class HttpRequest:
    __slots__ = ("method", "path", "query", "headers")

    def __init__(self, method, path, query, headers):
        self.method, self.path, self.query, self.headers = method, path, query, headers


MAX_HEAD = 16 << 10     # the request line and all headers, together


class HeadTooBig(ValueError):
    """The request line and headers are over MAX_HEAD bytes (or 100 headers)."""


async def read_head(reader) -> HttpRequest:
    """The request line and headers; ValueError for anything malformed.

    The body is read later (``read_body``), only once the request is allowed.
    ``reader`` must have a limit of MAX_HEAD (``HttpServer`` sets it), so no
    line is ever buffered past it.
    """
    from urllib.parse import parse_qsl, unquote, urlsplit
    left = MAX_HEAD

    async def line():
        nonlocal left
        try:
            data = await reader.readline()
        except ValueError:      # a line over the reader's limit
            raise HeadTooBig() from None
        left -= len(data)
        if left < 0:
            raise HeadTooBig()
        return data
    parts = (await line()).decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("bad request line")
    headers = {}
    for _ in range(100):
        data = await line()
        if data in (b"\r\n", b"\n", b""):
            break
        key, sep, value = data.decode("latin-1").partition(":")
        if not sep:
            raise ValueError("bad header")
        headers[key.strip().lower()] = value.strip()
    else:
        raise HeadTooBig()
    url = urlsplit(parts[1])
    return HttpRequest(parts[0].upper(), unquote(url.path), dict(parse_qsl(url.query)), headers)


async def read_body(reader, req, max_body: int) -> bytes:
    """The body of ``req`` (Content-Length only); ValueError when too big."""
    try:
        size = int(req.headers.get("content-length") or 0)
    except ValueError:
        raise ValueError("bad Content-Length") from None
    if not 0 <= size <= max_body:
        raise ValueError("the body is over %d bytes" % max_body)
    return await asyncio.wait_for(reader.readexactly(size), 10) if size else b""


_HTTP_HEADERS = ("X-Content-Type-Options: nosniff", "Referrer-Policy: no-referrer",
                 "X-Frame-Options: DENY", "Cache-Control: no-store")


def http_head(status: int, ctype: str, length=None, extra=()) -> bytes:
    from http import HTTPStatus
    lines = ["HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase), "Content-Type: " + ctype,
             "Connection: close"] + list(_HTTP_HEADERS) + list(extra)
    if length is not None:
        lines.append("Content-Length: %d" % length)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class HttpServer:
    """Accepts connections and hands each parsed request to ``handle``.

    Bounded everywhere, since anyone who reaches the port can connect: at
    most MAX_CONNECTIONS at once (then 503), MAX_HEAD bytes of headers (then
    431) sent within 10 s, MAX_SENDING connections of one address still
    sending them (a new one closes the oldest), 30 s for a reply to be
    taken, bodies only with Content-Length.
    """

    MAX_CONNECTIONS = 128
    MAX_SENDING = 16
    what = "http endpoint"

    def __init__(self, host, port):
        self.host, self.port = (host or "127.0.0.1").strip("[]"), to_int(port)
        self.server = None
        self._tasks: set = set()        # requests being answered (a quit among them)
        self._streams: set = set()      # open event streams: cancelled at close
        self._sending: dict = {}        # peer address -> its connections still sending headers, oldest first

    async def start(self):
        try:
            self.server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD)
        except OSError as e:
            raise CircusError("%s %s:%s: cannot bind: %s" % (self.what, self.host, self.port,
                                                              e.strerror or e)) from None
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return "%s:%s" % ("[%s]" % self.host if ":" in self.host else self.host, self.port)

    async def _serve(self, reader, writer):
        me = asyncio.current_task()
        self._tasks.add(me)
        try:
            if len(self._tasks) > self.MAX_CONNECTIONS:
                await self.send(writer, 503, "too many connections\n")
                return
            try:
                req = await self._read_head(reader, writer)
            except HeadTooBig:
                await self.send(writer, 431, "the request line and headers are over %d bytes\n" % MAX_HEAD)
                return
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
                await self.send(writer, 400, "bad request\n")
                return
            if "transfer-encoding" in req.headers:
                await self.send(writer, 501, "send the body with a Content-Length\n")
                return
            await self.handle(req, reader, writer)
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass        # the client went away
        except Exception:       # a bug of ours: log it, answer, stay up
            _log().exception("%s: request failed", self.what)
            try:
                await self.send(writer, 500, "internal error (see the daemon's log)\n")
            except Exception:
                pass
        finally:
            self._tasks.discard(me)
            self._streams.discard(me)
            writer.close()

    async def _read_head(self, reader, writer) -> HttpRequest:
        """read_head, within 10 s; the oldest of a peer's too many unfinished heads is cut off,
        so one address can't hold every connection (a real client sends its head at once)."""
        me = asyncio.current_task()
        peer = (writer.get_extra_info("peername") or ("",))[0]
        sending = self._sending.setdefault(peer, [])
        sending.append(me)
        if len(sending) > self.MAX_SENDING:
            oldest = sending.pop(0)
            oldest.cancel()
            self._tasks.discard(oldest)     # gone: not counted against MAX_CONNECTIONS meanwhile
        try:
            return await asyncio.wait_for(read_head(reader), 10)
        finally:
            if me in sending:
                sending.remove(me)
            if not sending and self._sending.get(peer) is sending:
                del self._sending[peer]

    async def send(self, writer, status, body, ctype="text/plain; charset=utf-8", extra=()):
        if isinstance(body, str):
            body = body.encode()
        writer.write(http_head(status, ctype, len(body), extra) + body)
        await asyncio.wait_for(writer.drain(), 30)

    async def send_json(self, writer, status, obj, extra=()):
        await self.send(writer, status, json.dumps(obj), "application/json", extra)

    async def handle(self, req, reader, writer):
        raise NotImplementedError

    def owns(self, task) -> bool:
        return task in self._tasks

    async def close(self):
        if self.server is None:
            return
        self.server.close()
        self.server = None
        me = asyncio.current_task()
        for t in list(self._streams):
            t.cancel()
        pending = [t for t in self._tasks if t is not me]
        if pending:
            await asyncio.wait(pending, timeout=2.0)


# ---------------------------------------------------------------------------
# 18. /metrics: Prometheus text for the arbiter
# ---------------------------------------------------------------------------


_METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def arbiter_metrics(arbiter) -> str:
    return metrics_text(await _usage_off_loop(snapshot_skeleton(arbiter), arbiter.metrics_cache))


def host_is_ours(host_header, names=()) -> bool:
    """Does a Host header name this machine: an IP address, localhost, or one of ``names``?

    A DNS-rebinding page reaches us under its own domain name, and a browser
    says so in Host; no header at all is no browser.
    """
    import ipaddress
    host = (host_header or "").strip().lower().rstrip(".")
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if not host_header or host == "localhost" or host.endswith(".localhost") or host in names:
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _own_names() -> set:
    import socket
    return {n.lower().rstrip(".") for n in (socket.gethostname(), socket.getfqdn()) if n}


async def own_names() -> set:
    """_own_names off the loop, within 5 s (a slow resolver must not hold anything up)."""
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, _own_names), 5)
    except (asyncio.TimeoutError, OSError):
        return set()


def not_ours_text(host) -> str:
    return ("Host %r is not a name of this machine: ask by IP address, localhost or the host's "
            "own name\n" % host)


#: The probes: open to anyone who reaches the port, no token (see answer_probe).
PROBES = ("/healthz", "/readyz")


async def answer_probe(req, writer, call) -> None:
    """GET or HEAD /healthz: 200 while the daemon answers (``call``: its command table, on its
    own loop, or `web`'s link to it). /readyz: 200 when `ready` says so, else 503; its JSON
    body is `ready`'s verdict and nothing else: {"ready": bool, "waiting": [{"watcher": NAME
    or null (the daemon), "reason": TEXT}]}."""
    if req.path == "/healthz":
        ok = (await call("numwatchers")).get("status") == "ok"
        status, ctype = (200 if ok else 503), "text/plain; charset=utf-8"
        body = b"ok\n" if ok else b"the daemon does not answer\n"
    else:
        reply = await call("ready")
        if reply.get("status") != "ok":     # no daemon, or a real circusd: no details leak out
            why = "the daemon has no ready command (not circus.py)" if reply.get("errno") == E_UNKNOWN_COMMAND \
                else "the daemon does not answer"
            reply = {"ready": False, "waiting": [{"watcher": None, "reason": why}]}
        status, ctype = (200 if reply["ready"] else 503), "application/json"
        body = json.dumps({"ready": reply["ready"], "waiting": reply["waiting"]}).encode()
    writer.write(http_head(status, ctype, len(body)) + (body if req.method != "HEAD" else b""))
    await asyncio.wait_for(writer.drain(), 30)


class MetricsServer(HttpServer):
    """``GET /metrics`` only: ``[circus] metrics_endpoint = HOST:PORT``.

    No token here, so the Host must name this machine (``host_is_ours``):
    a DNS-rebinding page in a local browser can't read it.
    """

    what = "metrics endpoint"

    def __init__(self, arbiter, endpoint):
        host, _, port = endpoint.rpartition(":")
        super().__init__(host, port)
        self.arbiter = arbiter
        self.names: set = set()         # this machine's names, besides addresses and localhost

    async def start(self):
        await super().start()
        if not is_loopback(self.host):
            _log().warning("metrics on %s can be read by anyone who reaches that address", self.address)
        self.names = await own_names()

    async def handle(self, req, reader, writer):
        if not host_is_ours(req.headers.get("host"), self.names):
            await self.send(writer, 421, not_ours_text(req.headers.get("host")))
        elif req.method == "GET" and req.path == "/metrics":
            await self.send(writer, 200, await arbiter_metrics(self.arbiter), _METRICS_TYPE)
        elif req.method in ("GET", "HEAD") and req.path in PROBES:
            await answer_probe(req, writer, lambda command: call_local(self.arbiter, command))
        else:
            await self.send(writer, 404, "not found: try /metrics, /healthz or /readyz\n")


# -- hubs: how the dashboard reaches a daemon ----------------------------------------

# ---------------------------------------------------------------------------
# 19. The web dashboard
# ---------------------------------------------------------------------------


class LocalHub:
    """Inside the daemon: commands go straight to the command table, events
    come as an arbiter listener (output only for the topics followed)."""

    def __init__(self, arbiter):
        self.arbiter = arbiter
        self.on_event = None            # callable(topic, payload), set by the WebServer
        self.prefixes: set = set()      # output topics someone follows (as PubChannel's)
        self._counts: dict = {}

    async def start(self):
        self.arbiter.listeners.append(self)

    async def call(self, command: str, props=None) -> dict:
        return await call_local(self.arbiter, command, props)

    def wants(self, topic: bytes) -> bool:
        return topic in self.prefixes

    def __call__(self, topic, payload):
        if self.on_event is not None:
            self.on_event(topic, payload)

    def follow(self, topic: str, on: bool) -> bool:
        """Count followers of an output topic; True when the count leaves or reaches 0."""
        n = max(self._counts.get(topic, 0) + (1 if on else -1), 0)
        self._counts[topic] = n
        (self.prefixes.add if n > 0 else self.prefixes.discard)(topic.encode())
        return n == (1 if on else 0)

    async def close(self):
        if self in self.arbiter.listeners:
            self.arbiter.listeners.remove(self)


class RemoteHub(LocalHub):
    """`python circus.py web`: a ZeroMQ client of a running daemon (ours or circusd).

    Requests are never queued for a daemon that is away (ZMQ_IMMEDIATE), and a
    request with no answer gets a new socket (the "lazy pirate" pattern), so a
    click made while the daemon was down can't be run when it comes back.
    """

    def __init__(self, endpoint: str, timeout: float = 5.0, curve=None):
        super().__init__(None)
        self.endpoint, self.timeout, self.curve = endpoint, timeout, curve
        self.ctx = self.sock = self.sub = None
        self._waiting: dict = {}
        self._replies_task = self._events_task = None

    def _connect(self):
        import zmq
        if self._replies_task is not None:
            self._replies_task.cancel()
        if self.sock is not None:
            self.sock.close(0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        _curve_client(self.sock, self.curve)
        self.sock.connect(self.endpoint)
        self._replies_task = asyncio.get_running_loop().create_task(self._replies(self.sock))

    async def start(self):
        import zmq
        import zmq.asyncio
        check_ipc_server(self.endpoint)
        self.ctx = zmq.asyncio.Context()
        self._connect()
        reply = await self.call("globaloptions", {"option": "pubsub_endpoint"})
        if reply.get("status") != "ok":
            raise CallError("%s: %s" % (self.endpoint, reply.get("reason")))
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        _curve_client(self.sub, self.curve)
        self.sub.connect(_reachable(reply["options"]["pubsub_endpoint"], self.endpoint))
        self.sub.setsockopt(zmq.SUBSCRIBE, b"watcher.")
        self._events_task = asyncio.get_running_loop().create_task(self._events())

    async def _replies(self, sock):
        while True:
            try:
                reply = json.loads(await sock.recv())
                fut = self._waiting.pop(reply.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
            except asyncio.CancelledError:
                raise
            except Exception as e:      # garbage from the peer, or a closed socket
                if sock.closed:
                    return
                _log().debug("web: bad reply ignored: %s", e)

    async def _events(self):
        while True:
            try:
                topic, payload = await self.sub.recv_multipart()
                payload = json.loads(payload)
                if isinstance(payload, dict):
                    self(topic.decode(), payload)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self.sub.closed:
                    return
                _log().debug("web: bad event ignored: %s", e)

    async def call(self, command: str, props=None) -> dict:
        import zmq
        props = props or {}
        msg_id = os.urandom(16).hex()
        timeout = self.timeout + (60 if props.get("waiting") else 0)
        fut = self._waiting[msg_id] = asyncio.get_running_loop().create_future()
        try:
            body = json.dumps({"command": command, "properties": props, "id": msg_id}).encode()
            if not await self.sock.poll(self.timeout * 1000, zmq.POLLOUT):
                return _error_reply("cannot reach %s%s" % (self.endpoint, _curve_hint(self.curve)),
                                    E_NOT_SPECIFIED, msg_id)
            self.sock.send(body, zmq.NOBLOCK)
            return await asyncio.wait_for(fut, timeout)
        except (asyncio.TimeoutError, zmq.Again):
            self._connect()
            return _error_reply("no answer from %s in %g s%s" % (self.endpoint, timeout, _curve_hint(self.curve)),
                                E_NOT_SPECIFIED, msg_id)
        finally:
            self._waiting.pop(msg_id, None)

    def follow(self, topic: str, on: bool) -> bool:
        import zmq
        changed = super().follow(topic, on)
        if changed:
            self.sub.setsockopt(zmq.SUBSCRIBE if on else zmq.UNSUBSCRIBE, topic.encode())
        return changed

    async def close(self):
        for t in (self._replies_task, self._events_task):
            if t is not None:
                t.cancel()
        for sock in (self.sock, self.sub):
            if sock is not None:
                sock.close(0)
        if self.ctx is not None:
            self.ctx.term()


def _circus_snapshot(status: dict, stats: dict) -> dict:
    """A snapshot from standard Circus replies (a real circusd has no `snapshot`)."""
    now, ws = time.time(), []
    for name, st in sorted((status.get("statuses") or {}).items()):
        procs = []
        for pid, info in sorted(((stats.get("infos") or {}).get(name) or {}).items()):
            if not isinstance(info, dict):
                continue
            try:
                rss = parse_mem_limit(info.get("mem_info1"))
            except (ValueError, TypeError):
                rss = None
            age = info.get("age") if isinstance(info.get("age"), (int, float)) else 0
            cpu = info.get("cpu") if isinstance(info.get("cpu"), (int, float)) else None
            procs.append({"wid": len(procs) + 1, "pid": int(pid), "state": ProcState.RUNNING,
                          "started": now - age, "cpu": cpu, "rss": rss})
        ws.append({"name": name, "status": st, "numprocesses": len(procs), "restarts": None, "flapping": False, "last_error": None,
                   "processes": procs, "cpu": round(sum(p["cpu"] or 0 for p in procs), 1),
                   "rss": sum(p["rss"] or 0 for p in procs)})
    return {"time": now, "watchers": ws, "daemon": {"pid": None, "version": "circusd", "started": None,
                                                      "rss": None, "cpu": None}}


async def take_snapshot(hub) -> dict:
    reply = await hub.call("snapshot")
    if reply.get("status") == "error" and reply.get("errno") == E_UNKNOWN_COMMAND:
        status, stats = await hub.call("status"), await hub.call("stats")
        for r in (status, stats):
            if r.get("status") != "ok":
                return r
        reply = dict(_circus_snapshot(status, stats), status="ok")
    return reply


# -- the dashboard server ----------------------------------------------------------------

def _sse(event: str, data) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event.encode(), json.dumps(data).encode())


class _Follower:
    """One browser's event stream: bounded in items and bytes; too slow, and it is
    dropped (the browser reconnects and starts again from a fresh snapshot)."""

    MAX_BYTES = 4 << 20

    def __init__(self):
        self.queue = asyncio.Queue(256)
        self.bytes = 0

    def push(self, item: bytes) -> None:
        if item is not None and self.bytes + len(item) <= self.MAX_BYTES:
            try:
                self.queue.put_nowait(item)
                self.bytes += len(item)
                return
            except asyncio.QueueFull:
                pass
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)     # the end of this stream

    def took(self, item: bytes) -> None:
        self.bytes -= len(item)


class WebServer(HttpServer):
    """The dashboard: one page, Server-Sent Events, and /api/COMMAND for scripts.

    Every request needs the token: ``httpd_token``, or one made at start and
    written 0600 in the private folder. A browser logs in once with
    ``/?token=...`` (then a session cookie: random, HttpOnly, SameSite=Strict,
    named after the port, forgotten after SESSION_IDLE unused; never the
    token, as browsers send cookies to every port of the host) or gives it as
    the basic-auth password; scripts send ``Authorization: Bearer TOKEN``. A
    POST also needs the page's CSRF token in ``X-CSRF-Token`` (not with a
    Bearer token, which a browser never adds by itself); no GET changes
    anything; a request a browser marks as cross-site is refused.
    """

    what = "httpd"
    REFRESH = 1.0       # seconds between snapshots while a browser watches
    QUICKEST = 0.3      # and at least this much between two, whatever happens
    MAX_STREAMS = 32
    MAX_BODY = 64 << 10
    SESSION_IDLE = 12 * 3600.0  # seconds a login lasts unused (an open event stream uses it)
    MAX_SESSIONS = 64           # logins kept; the least recently used goes first

    def __init__(self, hub, host="127.0.0.1", port=8080, token=None, metrics=None):
        super().__init__(host, port)
        if not is_loopback(self.host) and not token:
            raise CircusError("httpd_host %s is reachable from other hosts: set httpd_token in "
                              "[circus] (16+ characters) so that only those who know it get in, or "
                              "use httpd_host = 127.0.0.1" % self.host)
        import secrets
        self.hub, self.metrics = hub, metrics
        self.token = token or secrets.token_urlsafe(24)
        self.made_token = token is None
        self.token_file = None          # where start() writes a token it made
        self.csrf = secrets.token_urlsafe(24)
        self.sessions: dict = {}        # session cookie -> when it expires (monotonic), oldest use first
        self.watchers: set = set()      # _Followers of /events
        self.tails: dict = {}           # output topic -> set of _Followers
        self.last = None                # the latest snapshot, sent first to a new browser
        self.names = None               # this machine's names, looked up for the first probe that needs them
        self._ticker = None
        self._kick = None

    @property
    def cookie(self) -> str:
        return "circus_session_%d" % self.port

    @property
    def login_url(self) -> str:
        return "http://%s/?token=%s" % (self.address, self.token)

    async def start(self):
        self._kick = asyncio.Event()
        self.hub.on_event = self._on_event
        try:
            await self.hub.start()
            await super().start()
            if self.made_token:
                self.token_file = self._write_token()
        except BaseException:
            if self.server is not None:
                self.server.close()
            await self.hub.close()
            raise
        _log().info("dashboard on http://%s/ (token: %s)", self.address,
                    self.token_file or "httpd_token")

    def _write_token(self) -> str:
        folder = private_dir()
        ensure_private_dir(folder)
        path = os.path.join(folder, "httpd-%d.token" % self.port)
        fd = os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token + "\n")
        os.replace(path + ".new", path)
        return path

    # -- events in, pushed out ----------------------------------------------------
    def _on_event(self, topic, payload):
        if topic.startswith("output."):
            followers = self.tails.get(topic)
            if followers:
                data = payload.get("data", "")      # the page keeps 64 KiB: no more per chunk
                item = _sse("output", {"stream": topic.rsplit(".", 1)[1], "pid": payload.get("pid"),
                                       "data": data[-65536:]})
                for f in followers:
                    f.push(item)
        elif self.watchers:
            item = _sse("circus", {"topic": topic, "payload": payload})
            for f in self.watchers:
                f.push(item)
            self._kick.set()        # show the change soon, not at the next tick

    async def _tick(self):
        """Snapshots for the browsers watching: none watching, no work."""
        loop = asyncio.get_running_loop()
        while self.watchers:
            self._kick.clear()
            began = loop.time()
            try:
                snap = await take_snapshot(self.hub)
            except Exception as e:      # a bug or a broken hub: say so, keep going
                _log().exception("dashboard snapshot failed")
                snap = {"status": "error", "reason": str(e)}
            if snap.get("status") == "ok":
                self.last = _sse("snapshot", snap)
            item = self.last if snap.get("status") == "ok" else _sse("problem", snap.get("reason"))
            for f in self.watchers:
                f.push(item)
            try:
                await asyncio.wait_for(self._kick.wait(), self.REFRESH)
                await asyncio.sleep(max(0.0, began + self.QUICKEST - loop.time()))  # a storm: 3 a second
            except asyncio.TimeoutError:
                pass
        self.last = None        # the next browser gets a fresh one, not this old one

    async def _stream(self, reader, writer, follower, first=(), sid=None):
        """Send the follower's items as they come; the login ``sid`` lives while it runs."""
        self._streams.add(asyncio.current_task())
        writer.write(http_head(200, "text/event-stream; charset=utf-8", None, ("X-Accel-Buffering: no",)))
        writer.write(b"retry: 1000\n\n" + b"".join(first))
        await asyncio.wait_for(writer.drain(), 30)
        gone = asyncio.ensure_future(reader.read(1))       # the browser closed the page
        item = None
        try:
            while True:
                item = asyncio.ensure_future(follower.queue.get())
                await asyncio.wait((item, gone), timeout=15, return_when=asyncio.FIRST_COMPLETED)
                if gone.done() or (item.done() and item.result() is None):
                    return
                if item.done():
                    follower.took(item.result())
                    writer.write(item.result())
                else:
                    item.cancel()       # (nothing taken: a pending get loses no item)
                    writer.write(b": still here\n\n")     # finds half-open connections
                await asyncio.wait_for(writer.drain(), 30)
                if sid is not None:
                    self.touch(sid)
        finally:
            gone.cancel()
            if item is not None:
                item.cancel()

    async def _events(self, reader, writer, sid=None):
        follower = _Follower()
        self.watchers.add(follower)
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())
        else:
            self._kick.set()
        try:
            await self._stream(reader, writer, follower, [self.last] if self.last else [], sid)
        finally:
            self.watchers.discard(follower)

    async def _tail(self, req, reader, writer, sid=None):
        name = req.query.get("name", "")
        reply = await self.hub.call("tail", {"name": name, "bytes": 8000})
        if reply.get("errno") == E_UNKNOWN_COMMAND:      # a real circusd: no output to follow
            history = {"data": "", "note": "this daemon does not keep output (tail is circus.py's)"}
        elif reply.get("status") != "ok":
            await self.send_json(writer, 404, reply)
            return
        else:
            history = {"data": reply.get("data", "")}
        follower = _Follower()
        topics = ["output.%s.%s" % (name.lower().replace(" ", "_"), s) for s in ("stdout", "stderr")]
        for t in topics:
            self.tails.setdefault(t, set()).add(follower)
            self.hub.follow(t, True)
        try:
            await self._stream(reader, writer, follower, [_sse("history", history)], sid)
        finally:
            for t in topics:
                self.tails[t].discard(follower)
                if not self.tails[t]:
                    del self.tails[t]
                self.hub.follow(t, False)

    # -- requests -------------------------------------------------------------------------
    def _given_token(self, req):
        """The token a request carries: basic auth, Bearer or ?token=."""
        import base64
        scheme, _, cred = req.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            return cred.strip()
        if scheme.lower() == "basic":
            try:
                return base64.b64decode(cred.strip()).decode("utf-8").partition(":")[2]
            except ValueError:
                return None
        return req.query.get("token")

    def _token_ok(self, given) -> bool:
        import hmac
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def _new_session(self) -> str:
        import secrets
        self._forget_sessions()
        while len(self.sessions) >= self.MAX_SESSIONS:
            del self.sessions[next(iter(self.sessions))]
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = time.monotonic() + self.SESSION_IDLE
        return sid

    def _forget_sessions(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, until in self.sessions.items() if until <= now]:
            del self.sessions[sid]

    def session(self, req):
        """The live session of the request's cookie (its life renewed), else None."""
        for part in req.headers.get("cookie", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == self.cookie and self.touch(value):
                return value
        return None

    def touch(self, sid) -> bool:
        """Renew a session that is still live; False if it is unknown or expired."""
        until = self.sessions.pop(sid, None)
        if until is None or until <= time.monotonic():
            return False
        self.sessions[sid] = time.monotonic() + self.SESSION_IDLE     # (last in the order again)
        return True

    def _csrf_ok(self, req) -> bool:
        import hmac
        if req.headers.get("authorization", "").lower().startswith("bearer "):
            return True
        return hmac.compare_digest(req.headers.get("x-csrf-token", "").encode(), self.csrf.encode())

    async def handle(self, req, reader, writer):
        if req.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            await self.send(writer, 403, "refused: a request from another site\n")
            return
        if req.method in ("GET", "HEAD") and req.path in PROBES:
            await self._probe(req, writer)
            return
        sid = self.session(req)
        if sid is None and not self._token_ok(self._given_token(req)):
            await self.send(writer, 401, "this dashboard needs its token: open the address with "
                            "?token=... or give the token as the password (httpd_token, or the file "
                            "the daemon's log names)\n",
                            extra=('WWW-Authenticate: Basic realm="circus.py", charset="UTF-8"',))
            return
        path = req.path
        if req.method == "GET" and self._token_ok(req.query.get("token")):    # log in, then the clean address
            await self.send(writer, 303, "", extra=(
                "Location: %s" % (path if re.fullmatch(r"/[\w./-]*", path) else "/"),
                "Set-Cookie: %s=%s; HttpOnly; SameSite=Strict; Path=/" % (self.cookie, self._new_session())))
        elif path.startswith("/api/"):
            await self._api(req, reader, writer, path[5:].lower())
        elif req.method not in ("GET", "HEAD"):
            await self.send(writer, 405, "only GET here; actions are POST /api/COMMAND\n", extra=("Allow: GET",))
        elif path in _DASHBOARD_FILES:
            ctype, text = _DASHBOARD_FILES[path]
            extra = ()
            if path == "/":
                text = text.replace("{{csrf}}", self.csrf).replace("{{version}}", __version__)
                extra = (_DASHBOARD_CSP,)
            await self.send(writer, 200, text, ctype, extra)
        elif path in ("/events", "/tail"):
            if len(self._streams) >= self.MAX_STREAMS:
                await self.send(writer, 503, "too many open event streams\n")
            elif path == "/events":
                await self._events(reader, writer, sid)
            else:
                await self._tail(req, reader, writer, sid)
        elif path == "/metrics" and self.metrics is not None:
            try:
                await self.send(writer, 200, await self.metrics(), _METRICS_TYPE)
            except CircusError as e:
                await self.send(writer, 503, "%s\n" % e)
        else:
            await self.send(writer, 404, "not found\n")

    async def _probe(self, req, writer):
        """/healthz and /readyz need no token; as /metrics, the Host must name this machine
        (a DNS-rebinding page reads no watcher names)."""
        host = req.headers.get("host")
        if self.names is None and not host_is_ours(host):
            self.names = await own_names()
        if host_is_ours(host, self.names or ()):
            await answer_probe(req, writer, self.hub.call)
        else:
            await self.send(writer, 421, not_ours_text(host))

    async def _api(self, req, reader, writer, name):
        def refuse(status, reason, errno_=E_MESSAGE_ERROR, extra=()):
            return self.send_json(writer, status, _error_reply(reason, errno_, None), extra)
        if name not in COMMANDS or name in ("help", "listen"):
            return await refuse(404, "unknown command: %r" % name, E_UNKNOWN_COMMAND)
        if req.method == "GET":
            if not COMMANDS[name].read_only:     # a GET runs what changes nothing
                return await refuse(405, "%s changes things: use POST (with the X-CSRF-Token header)" % name,
                                    extra=("Allow: POST",))
            props = dict(req.query)
        elif req.method == "POST":
            if not self._csrf_ok(req):
                return await refuse(403, "missing or wrong X-CSRF-Token header (the page has it; scripts "
                                         "can send the token as Authorization: Bearer)")
            try:
                props = json.loads((await read_body(reader, req, self.MAX_BODY)).decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                props = None
            if not isinstance(props, dict):     # not even empty: `{}` is asked for, never assumed
                return await refuse(400, "the body must be a JSON object of properties ({} for none)",
                                    E_INVALID_JSON)
        else:
            return await refuse(405, "use GET or POST", extra=("Allow: GET, POST",))
        reply = await (take_snapshot(self.hub) if name == "snapshot" else self.hub.call(name, props))
        code = 200 if reply.get("status") == "ok" else 404 if reply.get("errno") == E_UNKNOWN_COMMAND else 400
        await self.send_json(writer, code, reply)

    async def close(self):
        if self._ticker is not None:
            self._ticker.cancel()
        await super().close()
        await self.hub.close()
        if self.token_file:
            try:
                os.unlink(self.token_file)
            except OSError:
                pass


#: The page's files: path -> (content type, text). The appendix at the end of this file
#: fills it in (as bottle keeps its templates), so the code reads without 300 lines of page.
_DASHBOARD_FILES: dict = {}
_DASHBOARD_CSP = ("Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; "
                  "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                  "frame-ancestors 'none'")


def web_main(argv) -> int:
    """``web``: the dashboard for a daemon that runs already (ours or a real circusd)."""
    import argparse
    p = argparse.ArgumentParser(prog="python circus.py web",
                                description="Serve the web dashboard of a running daemon.")
    p.add_argument("--endpoint", help="the daemon's control endpoint (default: as ctl finds it)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks one)")
    p.add_argument("--token-file", help="a file holding the token (else $CIRCUS_HTTPD_TOKEN); "
                                        "needed off loopback")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--key", help="CurveZMQ client secret key file (as ctl)")
    p.add_argument("--server-key", help="CurveZMQ server public key file (as ctl)")
    args = p.parse_args(argv)
    err = sys.stderr
    token = os.environ.get("CIRCUS_HTTPD_TOKEN") or None
    try:
        if args.token_file:
            with open(args.token_file) as f:
                token = f.read().strip()
        check_token(token)
        curve = client_keys(args.key, args.server_key)
    except OSError as e:
        err.write("error: %s: %s\n" % (args.token_file, e.strerror))
        return 2
    except (ValueError, CircusError) as e:
        err.write("error: %s\n" % e)
        return 2
    endpoint = args.endpoint or os.environ.get("CIRCUSCTL_ENDPOINT") or _default_ctl_endpoint()
    setup_logging("info", "-")

    async def serve():
        hub = RemoteHub(endpoint, args.timeout, curve)
        web = WebServer(hub, args.host, args.port, token, metrics=lambda: _remote_metrics(hub))
        await web.start()       # (closes the hub if it fails)
        # the user's own terminal: the address to open, with the token if we made it
        sys.stdout.write("dashboard for %s on %s\n" % (
            endpoint, web.login_url if web.made_token else "http://%s/" % web.address))
        sys.stdout.flush()
        stop = asyncio.get_running_loop().create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(0))
        try:
            await stop
        finally:
            await web.close()
    try:
        asyncio.run(serve())
    except CallError as e:
        err.write("error: %s\nIs the daemon running on %s? (set --endpoint)\n" % (e, endpoint))
        return 1
    except CircusError as e:
        err.write("error: %s\n" % e)
        return 1
    return 0


async def _remote_metrics(hub) -> str:
    snap = await take_snapshot(hub)
    if snap.get("status") != "ok":
        raise CircusError("the daemon did not answer: %s" % snap.get("reason"))
    return metrics_text(snap)


# ---------------------------------------------------------------------------
# 19b. Supervisor XML-RPC: [unix_http_server] / [inet_http_server] at /RPC2
# ---------------------------------------------------------------------------
# Supervisor's own API, so the real supervisorctl and XML-RPC tools drive the
# daemon. A Supervisor "process" is one watcher (a [program:x] with numprocs
# becomes one watcher per process); its group is the watcher's ``group``.

class SvFault(Exception):
    """An XML-RPC fault with Supervisor's code and text."""

    def __init__(self, name, text=None):
        super().__init__(name)
        self.code = SV_FAULTS[name]
        self.text = name if text is None else "%s: %s" % (name, text)


SV_FAULTS = {"UNKNOWN_METHOD": 1, "INCORRECT_PARAMETERS": 2, "BAD_ARGUMENTS": 3,
             "SIGNATURE_UNSUPPORTED": 4, "SHUTDOWN_STATE": 6, "BAD_NAME": 10, "BAD_SIGNAL": 11,
             "NO_FILE": 20, "NOT_EXECUTABLE": 21, "FAILED": 30, "ABNORMAL_TERMINATION": 40,
             "SPAWN_ERROR": 50, "ALREADY_STARTED": 60, "NOT_RUNNING": 70, "SUCCESS": 80,
             "ALREADY_ADDED": 90, "STILL_RUNNING": 91, "CANT_REREAD": 92}
SV_STATE_CODES = {ProcState.STOPPED: 0, ProcState.STARTING: 10, ProcState.RUNNING: 20,
                  ProcState.BACKOFF: 30, ProcState.STOPPING: 40, ProcState.EXITED: 100,
                  ProcState.FATAL: 200}
SV_API_VERSION, SV_VERSION = "3.0", "4.3.0"
#: What supervisorctl checks in statuses: a process that may be stopped.
_SV_RUNNING = (ProcState.RUNNING, ProcState.STARTING, ProcState.BACKOFF)


class SvLog:
    """A log read in slices: its file (never read whole unless asked), or, without
    one, what the daemon keeps in memory."""

    def __init__(self, path=None, ring=None):
        self.path, self.ring = path, ring

    def size(self) -> int:
        if self.path:
            try:
                return os.path.getsize(self.path)
            except OSError:
                return 0
        return len(self.ring.tail(None))

    def read(self, pos: int, n: int = -1) -> bytes:
        if not self.path:
            data = self.ring.tail(None)
            return data[pos:] if n < 0 else data[pos:pos + n]
        try:
            with open(self.path, "rb") as f:
                f.seek(pos)
                return f.read(n)
        except OSError:
            return b""


def sv_read_slice(log: SvLog, offset: int, length: int) -> str:
    """Supervisor's readLog arithmetic: a negative offset with length 0 is a tail."""
    if offset < 0:
        if length:
            raise SvFault("BAD_ARGUMENTS")
        return _sv_decode(log.read(max(log.size() + offset, 0)))
    if length < 0:
        raise SvFault("BAD_ARGUMENTS")
    return _sv_decode(log.read(offset, length or -1))


def sv_tail_slice(log: SvLog, offset: int, length: int) -> list:
    """Supervisor's tail arithmetic: [text, new offset, overflow]."""
    size, overflow = log.size(), False
    if size > offset + length:
        overflow, offset = True, size - 1
    if offset + length > size:
        if offset > size - 1:
            length = 0
        offset = size - length
    offset, length = max(offset, 0), max(length, 0)
    return [_sv_decode(log.read(offset, length)) if length else "", size, overflow]


def _sv_decode(data: bytes) -> str:
    return data.decode("utf-8", "replace")


class SvRpc:
    """Supervisor's XML-RPC methods over the arbiter; each returns what supervisord returns."""

    def __init__(self, arbiter):
        self.arb = arbiter
        self.exits: dict = {}           # watcher name -> last exit status (Supervisor's sense)
        self.starts: dict = {}          # watcher name -> time of its last spawn
        self._known = self._applied = arbiter.config   # see ``known``
        arbiter.listeners.append(self._on_event)

    @property
    def known(self):
        """The config as last read (reloadConfig, or the one the arbiter applied since: start,
        SIGHUP, reloadconfig, restart): what addProcessGroup adds."""
        if self.arb.config is not self._applied:
            self._known = self._applied = self.arb.config
        return self._known

    @known.setter
    def known(self, config):
        self._known = config

    def _on_event(self, topic, payload):
        """Supervisor's exitstatus (none for a start that failed; -1 for a signal) and laststart."""
        event = topic.rpartition(".")[2]
        if not (topic.startswith("watcher.") and event in ("reap", "spawn") and isinstance(payload, dict)):
            return
        w = next((w for w in self.arb.watchers if w.topic_name == topic[8:-len(event) - 1]), None)
        if w is None:
            return
        if event == "spawn":
            self.starts[w.name] = payload.get("time") or time.time()
        elif isinstance(payload.get("exit_code"), int):
            # a start that failed (within startsecs, not stopped) leaves none
            failed = w.state != ProcState.STOPPING and (payload.get("time") or time.time()) \
                - self.starts.get(w.name, 0) < (w.conf.options.get("startsecs") or 0)
            self.exits[w.name] = 0 if failed else max(payload["exit_code"], -1)

    # -- names ---------------------------------------------------------------
    @staticmethod
    def group_of(w) -> str:
        """Of a watcher or a WatcherConfig."""
        return _sv_names(w)[1]

    @staticmethod
    def proc_name(w) -> str:
        return _sv_names(w)[0]

    def namespec(self, w) -> str:
        g, n = self.group_of(w), self.proc_name(w)
        return n if g == n else "%s:%s" % (g, n)

    def group(self, name) -> list:
        """The watchers of group ``name``; BAD_NAME when there is none."""
        ws = self.groups().get(name)
        if ws is None:
            raise SvFault("BAD_NAME", name)
        return ws

    def groups(self) -> dict:
        out: dict = {}
        for w in self.arb.watchers:
            out.setdefault(self.group_of(w), []).append(w)
        return out

    def lookup(self, name):
        """``group:proc``, ``proc`` or ``group:*`` -> (group's watchers, the watcher or None)."""
        name = str(name)
        group, sep, proc = name.partition(":")
        if not sep:
            proc = name
        ws = self.groups().get(group)
        if ws is None:
            raise SvFault("BAD_NAME", name)
        if proc == "*" and sep:
            return ws, None
        for w in ws:
            if self.proc_name(w) == proc:
                return ws, w
        raise SvFault("BAD_NAME", name)

    def one(self, name):
        ws, w = self.lookup(name)
        if w is None:
            raise SvFault("BAD_NAME", name)
        return w

    def ordered(self, ws=None) -> list:
        """Supervisor's order: by group priority, group name, process priority, name."""
        def key(w):
            prio = -(w.conf.options.get("priority") or 0)
            gprio = prio if w.conf.group_priority is None else -w.conf.group_priority
            return gprio, self.group_of(w), prio, self.proc_name(w)
        return sorted(self.arb.watchers if ws is None else ws, key=key)

    # -- state ---------------------------------------------------------------
    def state_of(self, w):
        rows = process_rows(w)
        return rows[0]["state"], rows[0]["pid"] or 0

    def _check_state(self):
        if self.arb.stopping:
            raise SvFault("SHUTDOWN_STATE")

    def info(self, w) -> dict:
        state, pid = self.state_of(w)
        now = time.time()
        proc = next((p for p in w.processes.values()), None)
        start = int(proc.started) if proc else int(self.starts.get(w.name, 0))
        stop = int(w.sv_since or 0) if state in (ProcState.STOPPED, ProcState.EXITED, ProcState.FATAL) \
            or not proc else 0
        spawnerr = (w.last_error or "") if state in (ProcState.BACKOFF, ProcState.FATAL) else ""
        out, err = self.logfile(w, "stdout"), self.logfile(w, "stderr")
        info = {"name": self.proc_name(w), "group": self.group_of(w), "start": start, "stop": stop,
                "now": int(now), "state": SV_STATE_CODES.get(state, 1000), "statename": state,
                "spawnerr": spawnerr, "exitstatus": self.exits.get(w.name, 0),
                "logfile": out, "stdout_logfile": out, "stderr_logfile": err, "pid": pid}
        if state == ProcState.RUNNING:
            desc = "pid %d, uptime %s" % (pid, _uptime(max(now - proc.started, 0)))
        elif state in (ProcState.BACKOFF, ProcState.FATAL):
            desc = spawnerr or 'unknown error (try "tail %s")' % info["name"]
        elif state in (ProcState.STOPPED, ProcState.EXITED):
            desc = time.strftime("%b %d %I:%M %p", time.localtime(stop)) if start else "Not started"
        else:
            desc = ""
        info["description"] = desc
        return info

    @staticmethod
    def logfile(w, which) -> str:
        conf = getattr(w, "conf", w)
        stream = getattr(conf, which + "_stream", None) or {}
        if which == "stderr" and conf.options.get("redirect_stderr"):
            return ""
        return stream.get("filename") or ""

    def _result(self, w, fault=None) -> dict:
        return {"name": self.proc_name(w), "group": self.group_of(w),
                "status": fault.code if fault else SV_FAULTS["SUCCESS"],
                "description": fault.text if fault else "OK"}

    async def _each(self, ws, act, wanted) -> list:
        """``act`` on each wanted watcher at once; results in the order they finish, as
        supervisord's (a refusal at once, in process order)."""
        results: list = []

        async def run(w):
            try:
                await act(w)
                results.append(self._result(w))
            except SvFault as f:
                results.append(self._result(w, f))
        tasks = [asyncio.ensure_future(run(w)) for w in ws if wanted(w)]
        if tasks:
            await asyncio.gather(*tasks)
        return results

    # -- supervisor.* ------------------------------------------------------------
    def getAPIVersion(self):
        return SV_API_VERSION

    getVersion = getAPIVersion

    def getSupervisorVersion(self):
        return SV_VERSION

    def getIdentification(self):
        return "supervisor"

    def getState(self):
        if self.arb.stopping:
            return {"statecode": -1, "statename": "SHUTDOWN"}
        return {"statecode": 1, "statename": "RUNNING"}

    def getPID(self):
        return os.getpid()

    def _main_log(self) -> SvLog:
        path = self.arb.config.logoutput if self.arb.config else None
        return SvLog(path) if path and os.path.isfile(path) else SvLog(ring=self.arb.log_ring)

    def readLog(self, offset, length):
        return sv_read_slice(self._main_log(), int(offset), int(length))

    def clearLog(self):
        path = self.arb.config.logoutput if self.arb.config else None
        if path and os.path.isfile(path):
            with open(path, "r+b") as f:
                f.truncate(0)
        self.arb.log_ring = RingBuffer(self.arb.log_ring.size)
        return True

    async def shutdown(self):
        self._check_state()
        self.arb.loop.create_task(self.arb._guarded(self.arb.stop()))
        return True

    async def restart(self):
        self._check_state()
        self.arb.loop.create_task(self.arb._guarded(self.arb.restart()))
        return True

    def _new_groups(self):
        try:
            new = self.arb._load_new_config()
        except CommandError:
            raise SvFault("CANT_REREAD", "could not reread config") from None
        out: dict = {}
        for wc in new.watchers:
            out.setdefault(wc.group or wc.name, []).append(wc)
        return new, out

    def reloadConfig(self):
        self._check_state()
        new, groups = self._new_groups()
        self.known = new
        diff = self.arb.config_diff(new)
        touched = set(diff.get("added", [])) | set(diff.get("changed", [])) | set(diff.get("removed", []))
        old = self.groups()
        added = sorted(g for g in groups if g not in old)
        removed = sorted(g for g in old if g not in groups)
        changed = sorted(g for g in groups if g in old and (
            {wc.name for wc in groups[g]} != {w.name for w in old[g]}
            or any(n.name in touched for n in groups[g])))
        return [[added, changed, removed]]

    def _known_groups(self) -> dict:
        out: dict = {}
        for wc in self.known.watchers if self.known else ():
            out.setdefault(self.group_of(wc), []).append(wc)
        return out

    async def addProcessGroup(self, name):
        self._check_state()
        # in turn with reloadconfig and restart (the arbiter's lock), as `add`: a reload
        # that also adds this group must not make two watchers of one name
        async with self.arb._lock:
            self._check_state()
            groups = self._known_groups()
            if name in self.groups():
                raise SvFault("ALREADY_ADDED", name)
            if name not in groups:
                raise SvFault("BAD_NAME", name)
            fresh = [self.arb._make_watcher(wc) for wc in groups[name]]
            for w in fresh:
                self.arb._attach(w)
                self.arb.emit("watcher.%s.add" % w.topic_name, {"time": time.time()})
            await self.arb.start_watchers([w for w in fresh if w.conf.starts_at_boot])
        return True

    async def removeProcessGroup(self, name):
        self._check_state()
        async with self.arb._lock:      # as addProcessGroup
            ws = self.group(name)
            if any(self.state_of(w)[0] in _SV_RUNNING + (ProcState.STOPPING,) for w in ws):
                raise SvFault("STILL_RUNNING", name)
            for w in ws:
                self.arb.watchers.remove(w)
                self.starts.pop(w.name, None)
                self.exits.pop(w.name, None)
                self.arb.emit("watcher.%s.remove" % w.topic_name, {"time": time.time()})
            self.arb._let_go(ws)
        return True

    async def _start(self, w, wait=True):
        if self.state_of(w)[0] in _SV_RUNNING:     # BACKOFF too: its retry is on its way
            raise SvFault("ALREADY_STARTED", self.namespec(w))
        await _locked(w, w.start)
        if not wait:
            return
        try:
            await w.until_running()
        except CommandError:
            pass
        if self.state_of(w)[0] in (ProcState.STOPPED, ProcState.EXITED):
            raise SvFault("ABNORMAL_TERMINATION", self.namespec(w))
        if self.state_of(w)[0] not in (ProcState.RUNNING, ProcState.STARTING):
            raise SvFault("SPAWN_ERROR", self.namespec(w))

    async def startProcess(self, name, wait=True):
        self._check_state()
        ws, w = self.lookup(name)
        if w is None:
            return await self.startProcessGroup(name.partition(":")[0], wait)
        await self._start(w, wait)
        return True

    def _not_running(self, w):
        return self.state_of(w)[0] not in _SV_RUNNING

    async def startProcessGroup(self, name, wait=True):
        self._check_state()
        ws = self.group(name)
        return await self._each(self.ordered(ws), lambda w: self._start(w, wait), self._not_running)

    async def startAllProcesses(self, wait=True):
        self._check_state()
        return await self._each(self.ordered(), lambda w: self._start(w, wait), self._not_running)

    async def _stop(self, w, wait=True):
        if self.state_of(w)[0] not in _SV_RUNNING:
            raise SvFault("NOT_RUNNING", self.namespec(w))
        task = asyncio.ensure_future(_locked(w, w.stop))
        if wait:
            await task

    def _running(self, w):
        return self.state_of(w)[0] in _SV_RUNNING

    async def stopProcess(self, name, wait=True):
        self._check_state()
        ws, w = self.lookup(name)
        if w is None:
            return await self.stopProcessGroup(name.partition(":")[0], wait)
        await self._stop(w, wait)
        return True

    async def stopProcessGroup(self, name, wait=True):
        self._check_state()
        ws = self.group(name)
        return await self._each(self.ordered(ws), lambda w: self._stop(w, wait), self._running)

    async def stopAllProcesses(self, wait=True):
        self._check_state()
        return await self._each(self.ordered(), lambda w: self._stop(w, wait), self._running)

    async def _signal(self, w, sig):
        if self.state_of(w)[0] not in _SV_RUNNING or not w.processes:
            raise SvFault("NOT_RUNNING", self.namespec(w))
        w.send_signal(sig)

    @staticmethod
    def _signum(sig):
        try:
            return to_signum(sig)
        except ValueError:
            raise SvFault("BAD_SIGNAL", str(sig)) from None

    async def signalProcess(self, name, signal):
        self._check_state()
        ws, w = self.lookup(name)
        sig = self._signum(signal)
        if w is None:
            return await self.signalProcessGroup(name.partition(":")[0], signal)
        await self._signal(w, sig)
        return True

    async def signalProcessGroup(self, name, signal):
        self._check_state()
        ws = self.group(name)
        sig = self._signum(signal)
        return await self._each(self.ordered(ws), lambda w: self._signal(w, sig), self._running)

    async def signalAllProcesses(self, signal):
        self._check_state()
        sig = self._signum(signal)
        return await self._each(self.ordered(), lambda w: self._signal(w, sig), self._running)

    def getProcessInfo(self, name):
        return self.info(self.one(name))

    def getAllProcessInfo(self):
        ws = sorted(self.arb.watchers, key=lambda w: (self.group_of(w), self.proc_name(w)))
        return [self.info(w) for w in ws]

    def getAllConfigInfo(self):
        """The processes in use and those of the config last read that are not."""
        used = self.groups()
        spare = [wc for g, wcs in self._known_groups().items() if g not in used for wc in wcs]
        key = lambda w: (self.group_of(w), self.proc_name(w))      # noqa: E731
        return [self._config_info(getattr(w, "conf", w), w, w in self.arb.watchers)
                for w in sorted(self.arb.watchers + spare, key=key)]

    def _config_info(self, conf, w, inuse) -> dict:
        o = conf.options
        gprio = -conf.group_priority if conf.group_priority is not None else -(o.get("priority") or 0)
        try:
            uid = resolve_user(o["uid"], None)[0] if o.get("uid") is not None else None
        except (ValueError, KeyError, CircusError):     # a user deleted since
            uid = None
        command = " ".join(str(part) for part in (o.get("cmd"), o.get("args")) if part)
        info = {"autostart": bool(o.get("autostart")), "directory": o.get("working_dir") or "none",
                "uid": "none" if uid is None else uid, "command": command,
                "exitcodes": list(o.get("exitcodes") or [0]), "group": self.group_of(w),
                "group_prio": gprio, "inuse": inuse, "killasgroup": bool(o.get("killasgroup")),
                "name": self.proc_name(w), "process_prio": -(o.get("priority") or 0),
                "redirect_stderr": bool(o.get("redirect_stderr")),
                "startretries": max((o.get("max_retry") or 1) - 1, -1), "startsecs": o.get("startsecs") or 0,
                "stopsignal": int(o.get("stop_signal") or 15),
                "stopwaitsecs": int(o.get("graceful_timeout") or 0),
                "serverurl": "none"}       # (supervisord sends its None values as "none")
        for which in ("stdout", "stderr"):
            stream = getattr(conf, which + "_stream", None) or {}
            info.update({which + "_capture_maxbytes": 0, which + "_events_enabled": False,
                         which + "_logfile": self.logfile(w, which),
                         which + "_logfile_backups": int(stream.get("backup_count") or 0),
                         which + "_logfile_maxbytes": int(stream.get("max_bytes") or 0),
                         which + "_syslog": False})
        return info

    # -- logs ------------------------------------------------------------------
    def _log(self, w, which) -> SvLog:
        path = self.logfile(w, which)
        if not path:
            raise SvFault("NO_FILE", "None")
        return SvLog(path) if os.path.isfile(path) else SvLog(ring=w.tails[which])

    def readProcessStdoutLog(self, name, offset, length):
        return self._read(name, "stdout", offset, length)

    def readProcessStderrLog(self, name, offset, length):
        return self._read(name, "stderr", offset, length)

    def _read(self, name, which, offset, length):
        return sv_read_slice(self._log(self.one(name), which), int(offset), int(length))

    def tailProcessStdoutLog(self, name, offset, length):
        return sv_tail_slice(self._log(self.one(name), "stdout"), int(offset), int(length))

    def tailProcessStderrLog(self, name, offset, length):
        return sv_tail_slice(self._log(self.one(name), "stderr"), int(offset), int(length))

    def _clear(self, w):
        for which in ("stdout", "stderr"):
            path = self.logfile(w, which)
            if path and os.path.isfile(path):
                try:
                    with open(path, "r+b") as f:
                        f.truncate(0)
                except OSError:
                    raise SvFault("FAILED", self.namespec(w)) from None

    def clearProcessLogs(self, name):
        self._clear(self.one(name))
        return True

    clearProcessLog = clearProcessLogs

    async def clearAllProcessLogs(self):
        async def act(w):
            self._clear(w)
        return await self._each(self.ordered(), act, lambda w: True)

    def sendProcessStdin(self, name, chars):
        w = self.one(name)
        if not isinstance(chars, (str, bytes)):
            raise SvFault("INCORRECT_PARAMETERS", "chars not a string or bytes")
        if self.state_of(w)[0] not in _SV_RUNNING or not w.processes:
            raise SvFault("NOT_RUNNING", name)
        raise SvFault("NO_FILE", "Process has no stdin channel")

    def sendRemoteCommEvent(self, type, data):
        """Published as the "remote_communication" event (listeners take it from there)."""
        self.arb.emit("remote_communication", {"type": type, "data": data})
        return True

    # -- system.* ------------------------------------------------------------------
    def listMethods(self):
        return sorted(["supervisor." + m for m in SV_SIGNATURES if m not in _SV_SYSTEM]
                      + ["system." + m for m in _SV_SYSTEM] + list(_SV_ALIASES))

    def methodHelp(self, name):
        fn = self._method(name, SvFault("SIGNATURE_UNSUPPORTED"))
        return (fn.__doc__ or "").strip() or name

    def methodSignature(self, name):
        self._method(name, SvFault("SIGNATURE_UNSUPPORTED"))
        return SV_SIGNATURES[_SV_ALIASES.get(name, name).partition(".")[2]]

    async def multicall(self, calls):
        if not isinstance(calls, list):
            raise SvFault("INCORRECT_PARAMETERS")
        results = []
        for call in calls:
            try:
                if not isinstance(call, dict) or call.get("methodName") is None:
                    raise SvFault("INCORRECT_PARAMETERS", "No methodName")
                if call["methodName"] == "system.multicall":
                    raise SvFault("INCORRECT_PARAMETERS", "Recursive system.multicall forbidden")
                results.append(await self.call(call["methodName"], call.get("params", [])))
            except SvFault as f:
                results.append({"faultCode": f.code, "faultString": f.text})
        return results

    def _method(self, name, unknown=None):
        ns, _, meth = _SV_ALIASES.get(name, str(name)).partition(".")
        if meth not in SV_SIGNATURES or (ns == "system") != (meth in _SV_SYSTEM) or \
                ns not in ("system", "supervisor"):
            raise unknown or SvFault("UNKNOWN_METHOD")
        return getattr(self, meth)

    async def call(self, name, params):
        import inspect
        fn = self._method(name)
        try:
            inspect.signature(fn).bind(*params)
        except TypeError:
            raise SvFault("INCORRECT_PARAMETERS") from None
        try:
            value = fn(*params)
            if inspect.isawaitable(value):
                value = await value
        except CommandError as e:
            raise SvFault("FAILED", str(e)) from None
        except (ValueError, TypeError) as e:
            raise SvFault("BAD_ARGUMENTS", str(e)) from None
        return value


#: Each method's XML-RPC signature: the return type, then the parameters' types.
SV_SIGNATURES = {
    "getAPIVersion": ["string"], "getVersion": ["string"], "getSupervisorVersion": ["string"],
    "getIdentification": ["string"], "getState": ["struct"], "getPID": ["int"],
    "readLog": ["string", "int", "int"], "clearLog": ["boolean"], "shutdown": ["boolean"],
    "restart": ["boolean"], "reloadConfig": ["array"], "addProcessGroup": ["boolean", "string"],
    "removeProcessGroup": ["boolean", "string"], "startProcess": ["boolean", "string", "boolean"],
    "startProcessGroup": ["array", "string", "boolean"], "startAllProcesses": ["array", "boolean"],
    "stopProcess": ["boolean", "string", "boolean"], "stopProcessGroup": ["array", "string", "boolean"],
    "stopAllProcesses": ["array", "boolean"], "signalProcess": ["boolean", "string", "string"],
    "signalProcessGroup": ["array", "string", "string"], "signalAllProcesses": ["array", "string"],
    "getProcessInfo": ["struct", "string"], "getAllProcessInfo": ["array"], "getAllConfigInfo": ["array"],
    "readProcessStdoutLog": ["string", "string", "int", "int"],
    "readProcessStderrLog": ["string", "string", "int", "int"],
    "tailProcessStdoutLog": ["array", "string", "int", "int"],
    "tailProcessStderrLog": ["array", "string", "int", "int"],
    "clearProcessLogs": ["boolean", "string"], "clearProcessLog": ["boolean", "string"],
    "clearAllProcessLogs": ["array"], "sendProcessStdin": ["boolean", "string", "string"],
    "sendRemoteCommEvent": ["boolean", "string", "string"],
    "listMethods": ["array"], "methodHelp": ["string", "string"], "methodSignature": ["array", "string"],
    "multicall": ["array", "array"],
}
_SV_SYSTEM = ("listMethods", "methodHelp", "methodSignature", "multicall")
#: Older names supervisord still answers to.
_SV_ALIASES = {"supervisor.readMainLog": "supervisor.readLog",
               "supervisor.readProcessLog": "supervisor.readProcessStdoutLog",
               "supervisor.tailProcessLog": "supervisor.tailProcessStdoutLog"}


def sv_password_ok(given: str, want: str) -> bool:
    """Basic auth password check; ``{SHA}hex`` is a SHA-1 of the password, as Supervisor has it."""
    import hashlib
    import hmac
    if want.startswith("{SHA}"):
        given, want = hashlib.sha1(given.encode()).hexdigest(), want[5:].lower()
    return hmac.compare_digest(given.encode(), want.encode())


class SvRpcServer(HttpServer):
    """POST /RPC2 (XML-RPC) and GET /logtail/NAME[/stderr], /mainlogtail, on a unix socket
    ([unix_http_server]) or TCP ([inet_http_server]), with Basic auth when configured."""

    MAX_BODY = 1 << 20
    what = "supervisor http server"

    def __init__(self, arbiter, conf: SvHttpConf):
        super().__init__(conf.host or "127.0.0.1", conf.port or 0)
        self.conf, self.rpc = conf, SvRpc(arbiter)
        self.arbiter = arbiter
        self.names: set = set()         # this machine's names (checked in Host without a password)

    async def start(self):
        if self.conf.path is None:
            await super().start()
            if not self.conf.password:
                _log().warning("%s: XML-RPC on %s with no password: anyone who reaches it controls "
                               "the daemon", self.conf.where, self.address)
                try:        # (a slow resolver must not hold the start-up)
                    self.names = await asyncio.wait_for(
                        asyncio.get_running_loop().run_in_executor(None, _own_names), 5)
                except (asyncio.TimeoutError, OSError):
                    pass
            return
        sock = self._bind_unix()
        try:
            self.server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_HEAD)
        except OSError as e:
            sock.close()
            raise CircusError("%s %s: %s" % (self.what, self.conf.path, e.strerror or e)) from None

    def _bind_unix(self):
        """The socket file born with its mode (umask), chowned by folder fd: never by path."""
        import socket
        path, what = self.conf.path, "%s file" % self.conf.where
        dir_fd = _ipc_folder(path, what, path, sticky_ok=self.conf.chown is None)
        try:
            if _ipc_in_use(path):
                raise CircusError("%s %s: a server is already running there" % (what, path))
            try:
                os.unlink(os.path.basename(path), dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o777 & ~self.conf.chmod)
            try:
                sock.bind(path)
            except OSError as e:
                sock.close()
                raise CircusError("%s %s: cannot bind: %s" % (what, path, e.strerror)) from None
            finally:
                os.umask(old)
            if self.conf.chown:
                user, _, group = self.conf.chown.partition(":")
                _give_socket(dir_fd, os.path.basename(path), (user, group or None), path)
            sock.listen(socket_somaxconn())
            return sock
        finally:
            os.close(dir_fd)

    @property
    def address(self) -> str:
        return "unix://" + self.conf.path if self.conf.path else super().address

    async def close(self):
        await super().close()
        if self.rpc._on_event in self.arbiter.listeners:
            self.arbiter.listeners.remove(self.rpc._on_event)
        if self.conf.path:
            _unlink_ipc("ipc://" + self.conf.path)

    def _authorized(self, req) -> bool:
        import base64
        if not self.conf.username:
            return True
        kind, _, cred = req.headers.get("authorization", "").partition(" ")
        try:
            user, _, pw = base64.b64decode(cred, validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return kind.lower() == "basic" and user == self.conf.username and \
            sv_password_ok(pw, self.conf.password)

    async def handle(self, req, reader, writer):
        if not self._authorized(req):
            try:        # taken, so the client gets to read the 401
                await read_body(reader, req, self.MAX_BODY)
            except (ValueError, asyncio.IncompleteReadError):
                pass
            await self.send(writer, 401, "Unauthorized\n", extra=['WWW-Authenticate: Basic realm="default"'])
        elif not (self.conf.path or self.conf.username or self._from_a_client(req)):
            await self.send(writer, 403, "with no password set, XML-RPC takes Content-Type text/xml "
                            "and a Host naming this machine (a web page can send neither)\n")
        elif req.path.startswith("/RPC2"):
            if req.method != "POST":
                await self.send(writer, 400, "XML-RPC needs POST\n")
                return
            try:
                body = await read_body(reader, req, self.MAX_BODY)
            except ValueError as e:
                await self.send(writer, 413, "%s\n" % e)
                return
            except asyncio.IncompleteReadError:
                return          # the client went away mid-body
            await self._rpc(body, writer)
        elif req.method == "GET" and (req.path.startswith("/logtail/") or req.path == "/mainlogtail"):
            await self._logtail(req, writer)
        else:
            await self.send(writer, 404, "not found: XML-RPC is at /RPC2\n")

    def _from_a_client(self, req) -> bool:
        """Not a web page: with no password, a page in a local browser could otherwise post
        to us (text/plain needs no CORS preflight) or reach us by DNS rebinding."""
        if not host_is_ours(req.headers.get("host"), self.names):
            return False
        return req.method == "GET" or req.headers.get("content-type", "").split(";")[0].strip() == "text/xml"

    async def _rpc(self, body, writer):
        import xmlrpc.client
        try:
            params, method = xmlrpc.client.loads(body, use_builtin_types=False)
        except Exception:       # any malformed XML: what supervisord answers, 400
            await self.send(writer, 400, "bad XML-RPC request\n")
            return
        if not method:
            await self.send(writer, 400, "no method name\n")
            return
        try:
            value = await self.rpc.call(method, _sv_plain(params or ()))
            reply = xmlrpc.client.dumps((value,), methodresponse=True, allow_none=True)
        except SvFault as f:
            reply = xmlrpc.client.dumps(xmlrpc.client.Fault(f.code, f.text), methodresponse=True)
        await self.send(writer, 200, reply.encode("utf-8"), "text/xml")

    async def _logtail(self, req, writer):
        """supervisorctl tail -f / maintail -f: the last 1 KB, then what follows, until it hangs up."""
        parts = req.path.split("/")[2:]
        try:
            if req.path == "/mainlogtail":
                log = self.rpc._main_log()
            else:
                which = parts[1] if len(parts) > 1 and parts[1] in ("stdout", "stderr") else "stdout"
                log = self.rpc._log(self.rpc.one(parts[0]), which)
        except SvFault as f:
            await self.send(writer, 404, f.text + "\n")
            return
        self._streams.add(asyncio.current_task())
        writer.write(http_head(200, "text/plain; charset=utf-8"))
        pos = max(log.size() - 1024, 0)
        while not writer.is_closing():
            size = log.size()
            if size < pos:
                pos = 0         # the log was cleared or rotated
            while size > pos:       # (64 KB at a time, each taken before the next)
                chunk = log.read(pos, min(size - pos, 64 << 10))
                if not chunk:
                    break
                writer.write(chunk)
                pos += len(chunk)
                await asyncio.wait_for(writer.drain(), 30)
            await asyncio.sleep(0.5)


def _sv_plain(params):
    """XML-RPC values as plain Python (a Binary's bytes as text)."""
    import xmlrpc.client
    if isinstance(params, (list, tuple)):
        return [_sv_plain(p) for p in params]
    if isinstance(params, dict):
        return {k: _sv_plain(v) for k, v in params.items()}
    if isinstance(params, xmlrpc.client.Binary):
        return params.data.decode("utf-8", "replace")
    return params


# ---------------------------------------------------------------------------
# 20. Channels: what the daemon serves, started for the Arbiter
# ---------------------------------------------------------------------------


def check_endpoints(arbiter) -> None:
    """The ZeroMQ endpoints' safety rules (check_endpoint), before anything binds."""
    for what, ep in (("control endpoint", arbiter.endpoint), ("pubsub endpoint", arbiter.pubsub_endpoint),
                     ("stats endpoint", arbiter.stats_endpoint if arbiter.statsd else None)):
        if ep and not re.match(r"^(tcp://[^/]*:(\d+|\*)|ipc://.+|inproc://.+)$", ep):
            raise CircusError("%s %r: use tcp://HOST:PORT or ipc://PATH" % (what, ep))
        check_endpoint(ep, what, arbiter.allow_insecure_endpoint, bool(arbiter.curve_secret_key))


async def start_channels(arbiter) -> list:
    """The ZeroMQ channels, then the HTTP ones; all closed again if one fails."""
    import zmq.asyncio
    check_endpoints(arbiter)
    ctx = zmq.asyncio.Context()
    channels = []
    try:
        curve = None
        if arbiter.curve_secret_key:
            curve = CurveServer(arbiter.curve_secret_key, arbiter.curve_authorized_keys, ctx,
                                arbiter.curve_owner_keys)
        if arbiter.pubsub_endpoint:
            pub = PubChannel(arbiter.pubsub_endpoint, ctx, curve)
            arbiter.listeners.append(pub)
            channels.append(pub)
        if arbiter.endpoint:
            ctl = ControlChannel(arbiter, arbiter.endpoint, ctx, curve)
            await ctl.start()
            channels.append(ctl)
        if arbiter.multicast_endpoint:
            mc = MulticastChannel(arbiter, arbiter.multicast_endpoint)
            await mc.start()
            channels.append(mc)
        if arbiter.statsd and arbiter.stats_endpoint:
            channels.append(StatsChannel(arbiter, arbiter.stats_endpoint, ctx, curve))
        if arbiter.metrics_endpoint:
            metrics = MetricsServer(arbiter, arbiter.metrics_endpoint)
            await metrics.start()
            channels.append(metrics)
        if arbiter.httpd:
            host, port, token = arbiter.httpd
            web = WebServer(LocalHub(arbiter), host, port, token, metrics=lambda: arbiter_metrics(arbiter))
            await web.start()
            channels.append(web)
        for conf in arbiter.sv_http:
            rpc = SvRpcServer(arbiter, conf)
            await rpc.start()
            channels.append(rpc)
    except BaseException:
        for ch in channels:
            await ch.close()
        if curve is not None:
            await curve.close()
        raise
    if curve is not None:   # closed last: a CURVE socket with no ZAP handler admits any key
        channels.append(curve)
    return channels


CHANNEL_STARTERS.append(start_channels)


# ---------------------------------------------------------------------------
# 21. CLI: daemon, ctl, web, argv dispatch
# ---------------------------------------------------------------------------

class Pidfile:
    """A pidfile that refuses a second live daemon and cleans up after itself."""

    def __init__(self, path):
        self.path = os.path.abspath(path)

    def check(self):
        try:
            with open(self.path) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            return
        if pid and pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return                  # stale: its daemon is gone
            except PermissionError:
                pass
            raise CircusError("pidfile %s names pid %d, which is running: a daemon is already "
                              "started (stop it first, or remove the file if pid %d is not one)"
                              % (self.path, pid, pid))

    def create(self):
        """Write it whole under a temporary name, then rename: in the folder reached safely,
        the temporary file made new (O_EXCL), never written through a symlink."""
        self.check()
        d = _open_folder(os.path.dirname(self.path))
        try:
            base = os.path.basename(self.path)
            try:
                os.unlink(base + ".tmp", dir_fd=d)     # a stale one (unlink never follows a link)
            except FileNotFoundError:
                pass
            fd = _open_in(d, base + ".tmp", os.O_CREAT | os.O_EXCL, self.path + ".tmp")
            try:
                os.fchmod(fd, 0o644)
                _write_all(fd, b"%d\n" % os.getpid())
            finally:
                os.close(fd)
            os.replace(base + ".tmp", base, src_dir_fd=d, dst_dir_fd=d)
        finally:
            os.close(d)

    def remove(self):
        try:
            with open(self.path) as f:
                if int(f.read().strip() or 0) != os.getpid():
                    return
            os.unlink(self.path)
        except (OSError, ValueError):
            pass


def _check_fd_budget(cfg) -> None:
    """One clear line when the config's processes don't fit the fd limit.

    Each costs the daemon a pidfd and a pipe per captured stream: 3 fds. When
    that is too many, output with no stream is not captured (1 fd each; see
    Launcher.fds_short); if even that is too many, what fits runs and the
    rest shows BACKOFF.
    """
    ws = [w for w in cfg.watchers if w.options["autostart"]]
    wanted = sum(w.options["numprocesses"] for w in ws)
    _NOFILE.clear()         # read it afresh
    ensure_fds(fds_needed(wanted))
    soft = fd_limit()
    full = 3 * wanted + 64
    if soft is None or full <= soft:
        return
    least = 64 + sum(w.options["numprocesses"] * (1 + bool(w.stdout_stream) + bool(w.stderr_stream))
                     for w in ws)
    how = "raise it (ulimit -n, LimitNOFILE= in the unit, [supervisord] minfds) or run as root"
    if least <= soft:
        _log().warning("%d processes need about %d open files to capture their output but the limit "
                       "is %d: output with no stream goes straight to the daemon's stdout/stderr "
                       "instead (`tail` misses it); %s", wanted, full, soft, how)
    else:
        _log().error("%d processes need at least %d open files but the limit is %d: about %d of them "
                     "can start; %s", wanted, least, soft, max(0, (soft - 64) * wanted // (least - 64)), how)


def daemonize():
    """Double fork, new session, stdio on /dev/null (the cwd is kept, as in Circus)."""
    for con in _CONSOLES.values():      # the log lines said so far, before the parent goes
        con.flush(1.0)
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _daemon_parser():
    import argparse
    p = argparse.ArgumentParser(
        prog="python circus.py daemon",
        description="Run the circus.py daemon on a Circus INI config file.")
    p.add_argument("config", help="the config file (Circus INI)")
    p.add_argument("--daemon", action="store_true", help="detach and run in the background")
    p.add_argument("--pidfile", help="write the daemon's pid there (refuses to start twice)")
    p.add_argument("--log-level", dest="loglevel", type=str.lower,
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="log level (default: info, or the config's loglevel)")
    p.add_argument("--log-output", dest="logoutput",
                   help="'-' (stderr, default), 'stdout', a file path, or syslog://...")
    p.add_argument("--logger-config", dest="loggerconfig", help="a logging config file (.ini/.json)")
    p.add_argument("--version", action="version",
                   version="circus.py %s (circusd %s compatible)" % (__version__, CIRCUS_COMPAT))
    return p


def _logger_config(path):
    import logging.config
    if path.endswith(".json"):
        with open(path) as f:
            logging.config.dictConfig(json.load(f))
    else:
        logging.config.fileConfig(path, disable_existing_loggers=False)


def _missing_dependency() -> str | None:
    """The one line to say when pyzmq or psutil is not installed (fail early), else None."""
    try:
        import psutil  # noqa: F401
        import zmq  # noqa: F401
    except ImportError as e:
        return "%s: install the dependencies with: python -m pip install pyzmq psutil" % e
    return None


def daemon_main(argv) -> int:
    """``daemon``: read the config (errors -> one line, exit 1), then run."""
    args = _daemon_parser().parse_args(argv)
    err = sys.stderr
    if os.getpid() == 1:    # the kernel drops what PID 1 has no handler for: SIGTERM quits until the loop's own
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    missing = _missing_dependency()
    if missing:
        err.write("error: %s\n" % missing)
        return 1
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        err.write("error: %s\n" % e)
        return 1
    try:
        arbiter, pidfile = _daemon_setup(args, cfg)
        _raise_nofile(cfg.minfds)
    except (CircusError, OSError, ValueError) as e:
        err.write("error: %s\n" % (os_error_text(e) if isinstance(e, OSError) else e))
        return 1
    _check_fd_budget(cfg)
    if args.daemon:
        daemonize()
    error = _daemon_enter(cfg, pidfile)
    if error:
        err.write("error: %s\n" % error)
        return 1
    return _run_arbiter(arbiter, pidfile)


def _run_arbiter(arbiter, pidfile=None) -> int:
    """Run until quit; the daemon's exit code (critical_exit's, 0, or 1 on an error)."""
    arbiter.keep_trees = (arbiter.config.subreaper, arbiter.config.cgroup)     # a daemon's, not a library's
    try:
        return arbiter.run()
    except CircusError as e:
        _log().error("%s", e)
        sys.stderr.write("error: %s\n" % e)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if pidfile:
            pidfile.remove()


def _daemon_setup(args, cfg) -> tuple:
    """Logging, the pidfile checked (not written yet) and the arbiter built."""
    loggerconfig = args.loggerconfig or cfg.loggerconfig
    if loggerconfig and loggerconfig != "default":
        _logger_config(loggerconfig)
    else:
        setup_logging(args.loglevel or cfg.loglevel or "info", args.logoutput or cfg.logoutput or "-",
                      echo=cfg.log_echo and not args.daemon, fmt=cfg.log_format)
    path = args.pidfile or cfg.pidfile
    pidfile = Pidfile(path) if path else None
    if pidfile:
        pidfile.check()
    for w in cfg.warnings:
        _log().warning("%s", w)
    return Arbiter.from_config(cfg), pidfile


def _daemon_enter(cfg, pidfile):
    """Into [supervisord] directory, then the pidfile written; the error text, or None."""
    if cfg.directory:
        try:
            os.chdir(cfg.directory)
        except OSError as e:
            return "[supervisord] directory %s: %s" % (cfg.directory, e.strerror)
    if pidfile:
        try:
            pidfile.create()
        except (CircusError, OSError) as e:
            return "pidfile: %s" % (os_error_text(e) if isinstance(e, OSError) else e)
    return None


def _check_logging(cfg) -> None:
    """What the daemon's logging setup would refuse, without opening the log file."""
    if cfg.loglevel and not isinstance(getattr(logging, str(cfg.loglevel).upper(), None), int):
        raise ConfigError("log level %r: use critical, error, warning, info or debug" % cfg.loglevel)
    out = cfg.logoutput
    if out and out not in ("-", "stderr", "stdout") and not out.startswith("syslog://"):
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            raise CircusError("logoutput %s: the folder %s does not exist" % (out, folder))
        if os.path.lexists(out):        # opened as the daemon will (a planted symlink...)
            try:
                os.close(open_log(os.path.abspath(out)))
            except OSError as e:
                raise CircusError("logoutput %s: %s" % (out, e.strerror or e)) from None
    if cfg.loggerconfig and cfg.loggerconfig != "default" and not os.path.isfile(cfg.loggerconfig):
        raise CircusError("loggerconfig %s: no such file" % cfg.loggerconfig)


def _check_ipc_folders(arb) -> None:
    """The folder rules _bind applies at start, binding nothing (a missing private folder
    is made at start, so only an existing one is checked)."""
    for what, ep, owner in (("control endpoint", arb.endpoint, arb.endpoint_owner),
                            ("pubsub endpoint", arb.pubsub_endpoint, None),
                            ("stats endpoint", arb.stats_endpoint if arb.statsd else None, None)):
        if not ep or not ep.startswith("ipc://") or ep.startswith("ipc://@"):
            continue
        folder = os.path.dirname(ep[6:])
        if folder == private_dir():
            if os.path.isdir(folder):
                ensure_private_dir(folder)
            continue
        os.close(_ipc_folder(ep[6:], what, ep, sticky_ok=owner is None))


def check_main(argv) -> int:
    """``check CONFIG``: load and check a config as the daemon would at start, binding and
    starting nothing (so it works while that daemon runs), like ``nginx -t``. Every warning
    and the error go to stderr; exit 0 (it would start) or 1."""
    import argparse
    p = argparse.ArgumentParser(prog="python circus.py check", description=(
        "Load and check a config file as the daemon would, starting and binding nothing: "
        "every warning and error, then exit 0 (it would start) or 1."))
    p.add_argument("config", help="the config file (Circus INI or Supervisor), or a Procfile")
    args = p.parse_args(argv)
    if os.path.basename(args.config).startswith("Procfile"):
        return check_procfile(args.config)
    said = []

    class Collect(logging.Handler):     # what the daemon would log while it builds itself
        def emit(self, record):
            said.append(record.getMessage())
    handler = Collect(logging.WARNING)
    _log().addHandler(handler)
    error = cfg = None
    try:
        cfg = load_config(args.config)
        said[:0] = cfg.warnings
        arb = Arbiter.from_config(cfg)      # hooks, stream classes, plugins, as at start
        check_endpoints(arb)
        _check_ipc_folders(arb)
        _check_logging(cfg)
        if cfg.pidfile:         # its folder, reached as the daemon will (the file may be in use)
            try:
                os.close(_open_folder(os.path.dirname(os.path.abspath(cfg.pidfile))))
            except OSError as e:
                raise CircusError("pidfile %s: %s" % (cfg.pidfile, os_error_text(e))) from None
        for conf in cfg.sockets:
            CircusSocket(conf).check_address()
        if cfg.directory and not os.path.isdir(os.path.expanduser(cfg.directory)):
            raise CircusError("[supervisord] directory %s does not exist" % cfg.directory)
        _raise_nofile(cfg.minfds)
        _check_fd_budget(cfg)
    except (CircusError, OSError, ValueError) as e:
        error = str(e)
    finally:
        _log().removeHandler(handler)
    for line in said:
        sys.stderr.write("warning: %s\n" % line)
    if error:
        sys.stderr.write("error: %s\n" % error)
        return 1
    sys.stdout.write("%s: ok (%d watchers, %d sockets, %d plugins; %d warnings)\n" % (
        args.config, len(cfg.watchers), len(cfg.sockets), len(cfg.plugins), len(said)))
    return 0


# -- Procfile mode (honcho/foreman): `start [PROCESS...]` and `check Procfile` ----------------

_PROCFILE_LINE = re.compile(r"([A-Za-z0-9_-]+):\s*(\S.*)$")


def parse_procfile(path: str) -> dict:
    """``name: command`` lines (blank and ``#`` lines skipped): {name: command} in file
    order. ConfigError, one line, for a missing file, a bad line or a name given twice
    (names compare as watcher names do: any case)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("Procfile %s: %s (give another with -f)" % (path, e.strerror or e)) from None
    procs, lines = {}, {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _PROCFILE_LINE.match(line)
        if m is None:
            raise ConfigError("%s:%d: %r is not a `name: command` line (names: letters, digits, _ and -)"
                              % (path, n, line.strip()))
        name = m.group(1)
        if name.lower() in lines:
            raise ConfigError("%s:%d: process type %r is already defined on line %d"
                              % (path, n, name, lines[name.lower()]))
        procs[name], lines[name.lower()] = m.group(2).strip(), n
    if not procs:
        raise ConfigError("Procfile %s: no process types in it (lines are `name: command`)" % path)
    return procs


_DOTENV_LINE = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")


def parse_dotenv(text: str) -> dict:
    """A .env file as honcho reads it: NAME=value lines, the rest ignored; a value in
    single quotes is literal, in double quotes it takes \\n, \\t and \\-escapes, bare it
    ends at a `` #`` comment."""
    values = {}
    for line in text.splitlines():
        m = _DOTENV_LINE.match(line)
        if m is None:
            continue
        raw = m.group(2).strip()
        if len(raw) >= 2 and raw[0] in "'\"" and raw[-1] == raw[0]:
            value = raw[1:-1]
            if raw[0] == '"':
                value = re.sub(r"\\(.)", lambda e: {"n": "\n", "t": "\t"}.get(e.group(1), e.group(1)), value)
        else:
            value = re.split(r"\s+#", raw, maxsplit=1)[0]
        values[m.group(1)] = value
    return values


def _read_env_files(spec: str | None) -> dict:
    """-e FILE[,FILE...] merged (a later file wins); .env when not given and present."""
    files = [f.strip() for f in (spec or ".env").split(",") if f.strip()]
    env = {}
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                env.update(parse_dotenv(f.read()))
        except FileNotFoundError:
            if spec:        # named on the command line: it must be there
                raise ConfigError("env file %s: no such file (-e)" % path) from None
        except OSError as e:
            raise ConfigError("env file %s: %s" % (path, e.strerror or e)) from None
    return env


def _concurrency(spec: list, names) -> dict:
    """-c/-m web=2,worker=1 (``all=N`` for every type): {name: N}, 1 for the rest."""
    counts = dict.fromkeys(names, 1)
    for item in ",".join(spec or ()).split(","):
        if not item.strip():
            continue
        name, _, n = item.partition("=")
        name = name.strip()
        try:
            count = _count(n)
        except ValueError:
            raise ConfigError("-c/-m %s: give name=N with N a number >= 0" % item.strip()) from None
        if name == "all":
            counts = dict.fromkeys(counts, count)
        elif name in counts:
            counts[name] = count
        else:
            raise ConfigError("-c/-m %s: no process type %r in the Procfile (%s)"
                              % (item.strip(), name, ", ".join(counts)))
    return counts


def procfile_config(args) -> tuple:
    """The CircusConfig a Procfile run makes (one critical watcher per process type, no
    respawn) and the width of its labels; ConfigError for bad input."""
    procs = parse_procfile(args.procfile)
    for name in args.processes:
        if name not in procs:
            raise ConfigError("no process type %r in %s (it has %s)" % (name, args.procfile, ", ".join(procs)))
    names = list(dict.fromkeys(args.processes)) or list(procs)
    env = _read_env_files(args.env)
    port = env.pop("PORT", None) or args.port or os.environ.get("PORT") or 5000
    try:
        port = _port(port)
    except ValueError as e:
        raise ConfigError("PORT %s: %s" % (port, e)) from None
    counts = _concurrency(args.concurrency, names)
    width = max([len("system")] + [len("%s.%d" % (n, counts[n])) for n in names])
    cfg = CircusConfig()
    cfg.shutdown_timeout = args.timeout
    stream = {"class": "JSONStdoutStream"} if args.json else {"class": "StdoutStream"} if args.no_prefix \
        else {"class": "PrefixStdoutStream", "width": width, "colour": "false" if args.no_colour else "auto"}
    for i, name in enumerate(names):
        try:
            wc = WatcherConfig(name, {
                "cmd": procs[name], "shell": True, "numprocesses": counts[name], "respawn": False,
                "critical": True, "copy_env": True, "env": env, "port_base": port + 100 * i,
                "stopasgroup": True, "killasgroup": True, "graceful_timeout": args.timeout,
                "stdout_stream": stream, "stderr_stream": stream})
            cfg.watchers.append(wc.check())
        except ValueError as e:
            raise ConfigError("%s: %s" % (name, e)) from None
    return cfg, width


class _ProcfileSays:
    """The daemon's own lines in Procfile mode, as honcho words them: ``web.1 started
    (pid=123)``, ``web.1 stopped (rc=3)`` (an arbiter listener)."""

    def __init__(self, arbiter):
        self.arbiter = arbiter
        self.labels = {}        # pid -> "web.1"
        self.log = logging.getLogger("circus.procfile")
        self.log.setLevel(logging.INFO)     # these lines, while the daemon's own say warnings only

    def __call__(self, topic, payload):
        parts = topic.split(".")
        pid = payload.get("process_pid") if isinstance(payload, dict) else None
        if parts[0] != "watcher" or pid is None:
            return
        if parts[-1] == "spawn":
            for w in self.arbiter.watchers:
                p = w.processes.get(pid)
                if p is not None and w.topic_name == ".".join(parts[1:-1]):
                    self.labels[pid] = "%s.%d" % (w.name, p.wid)
                    self.log.info("%s started (pid=%d)", self.labels[pid], pid)
        elif parts[-1] == "reap" and pid in self.labels:
            self.log.info("%s stopped (rc=%s)", self.labels.pop(pid), payload.get("exit_code"))


def _procfile_logging(args, width) -> None:
    """``HH:MM:SS system | ...`` lines on stdout (stderr with --json: stdout is JSON lines)."""
    setup_logging("warning", "stderr" if args.json else "stdout")
    colour = None if args.no_colour or not use_colour("auto", 2 if args.json else 1) else label_colour("system")

    class SystemLines(logging.Formatter):
        def format(self, record):
            return prefix_line("system", super().format(record), width, colour).decode().rstrip("\n")
    for h in _log().handlers:
        h.setFormatter(SystemLines("%(message)s"))


def _start_parser():
    import argparse
    p = argparse.ArgumentParser(
        prog="python circus.py start",
        description="Run the processes of a Procfile (as honcho and foreman do): when one exits, "
                    "all stop and its exit code is ours; Ctrl-C or SIGTERM stop all (exit 0).")
    p.add_argument("processes", nargs="*", metavar="PROCESS", help="process types to run (default: all)")
    p.add_argument("-f", "--procfile", default="Procfile", help="the Procfile (default: ./Procfile)")
    p.add_argument("-e", "--env", help="env files, comma-separated, later ones win (default: .env if present)")
    p.add_argument("-c", "--concurrency", "-m", "--formation", action="append", metavar="NAME=N,...",
                   help="how many of each type (default 1 each; all=N for every type)")
    p.add_argument("-p", "--port", type=_port, help="base port: PORT is this + 100 per type + 1 per "
                   "process (default: PORT from the env file, then from the environment, then 5000)")
    p.add_argument("-t", "--timeout", type=_seconds, default=5.0,
                   help="seconds to stop in before SIGKILL (shutdown_timeout; default 5)")
    p.add_argument("--no-prefix", action="store_true", help="output lines as they are, no prefix")
    p.add_argument("--no-colour", "--no-color", action="store_true", help="no colours in the prefixes")
    p.add_argument("--json", action="store_true", help="output as JSON lines (time, name, wid, pid, "
                   "stream, line); the daemon's own lines go to stderr")
    return p


def start_main(argv) -> int:
    """``start``: a Procfile run, serving ctl on the default endpoint."""
    args = _start_parser().parse_args(argv)
    missing = _missing_dependency()
    if missing:
        sys.stderr.write("error: %s\n" % missing)
        return 1
    try:
        cfg, width = procfile_config(args)
        _procfile_logging(args, width)
        arbiter = Arbiter.from_config(cfg)
    except (CircusError, ValueError) as e:
        sys.stderr.write("error: %s\n" % e)
        return 1
    arbiter.listeners.append(_ProcfileSays(arbiter))
    return _run_arbiter(arbiter)


def check_procfile(path: str) -> int:
    """``check Procfile``: one line, exit 0 (with a summary) or 1."""
    try:
        procs = parse_procfile(path)
    except ConfigError as e:
        sys.stderr.write("error: %s\n" % e)
        return 1
    sys.stdout.write("%s: ok (%d process types: %s)\n" % (path, len(procs), ", ".join(procs)))
    return 0


_MAIN_USAGE = """\
usage: python circus.py daemon CONFIG [--daemon] [--pidfile F] [--log-level L] [--log-output F]
       python circus.py check CONFIG|Procfile
       python circus.py start [PROCESS...] [-f Procfile] [-e .env] [-c web=2] [-p 5000] [--json]
       python circus.py ctl [--endpoint E] [--timeout S] [--json] COMMAND [ARGS]
       python circus.py web [--endpoint E] [--host H] [--port P] [--token-file F]
       python circus.py --version

circus.py %s: a process and socket manager, compatible with Circus %s.
'python circus.py daemon --help' and 'python circus.py ctl help' tell more.
"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(_MAIN_USAGE % (__version__, CIRCUS_COMPAT))
        return 0 if argv else 2
    mode, rest = argv[0], argv[1:]
    if mode == "--version":
        sys.stdout.write("circus.py %s (Circus %s compatible)\n" % (__version__, CIRCUS_COMPAT))
        return 0
    if mode == "ctl":
        try:
            return ctl_main(rest)
        except KeyboardInterrupt:
            return 130
    if mode == "daemon":
        return daemon_main(rest)
    if mode == "web":
        return web_main(rest)
    if mode == "check":
        return check_main(rest)
    if mode == "start":
        return start_main(rest)
    if os.path.isfile(mode) or (mode.startswith("-") and any(os.path.isfile(a) for a in rest)):
        return daemon_main(argv)            # `python circus.py [--daemon...] FILE`, as circusd
    sys.stderr.write("error: no such file: %r (give a config file, or the mode daemon, ctl, web, "
                     "check or start; see python circus.py --help)\n" % mode)
    return 2


def _bytecode_is_fresh(pyc: str, src: str) -> bool:
    """Does ``pyc`` hold the code of ``src`` as it is now (importlib's header check)?"""
    import importlib.util
    try:
        with open(pyc, "rb") as f:
            head = f.read(16)
        st = os.stat(src)
    except OSError:
        return False
    return (len(head) == 16 and head[:4] == importlib.util.MAGIC_NUMBER and head[4:8] == b"\0" * 4
            and int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF)


#: Follows the cached bytecode in a re-executed daemon's command line: the source's path,
#: so `ps` and `pgrep -f circus.py` still show what runs (main never sees it).
_SOURCE_ARG = "--source="


def _prune_bytecode(cache: str, keep: str) -> None:
    """Remove cached files older than a day that no running daemon uses (each checkout
    and Python version leaves its own); only where /proc tells which are in use."""
    now, old = time.time(), []
    try:
        for name in os.listdir(cache):
            path = os.path.join(cache, name)
            if path != keep and now - os.stat(path).st_mtime > 86400:
                old.append(path)
    except OSError:
        return
    if not old or not os.path.isdir("/proc/self"):
        return
    in_use = set()
    for pid in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                in_use.update(os.fsdecode(a) for a in f.read().split(b"\0"))
        except OSError:
            pass
    for path in old:
        if path not in in_use:
            try:
                os.unlink(path)
            except OSError:
                pass


def _lean_restart(argv) -> None:
    """``python circus.py daemon``: Python compiled this whole file for __main__, and the
    compiler's memory (~15 MB) stays with the process for good. A long-lived daemon
    re-executes itself (same pid) from bytecode cached in its private folder."""
    if __file__.endswith(".pyc") and argv and argv[0].startswith(_SOURCE_ARG):
        del sys.argv[1]         # we are that re-executed daemon
        return
    if not __file__.endswith(".py") or not argv or not (
            argv[0] == "daemon" or (argv[0] not in ("ctl", "web") and os.path.isfile(argv[0]))):
        return
    import hashlib
    import py_compile
    src = os.path.abspath(__file__)
    cache = os.path.join(private_dir(), "bytecode")
    pyc = os.path.join(cache, "circus-%s.%s.pyc" % (hashlib.sha1(src.encode()).hexdigest()[:12],
                                                    sys.implementation.cache_tag))
    try:
        ensure_private_dir(private_dir())       # ours and 0700: nobody else can plant code
        os.makedirs(cache, mode=0o700, exist_ok=True)
        if not _bytecode_is_fresh(pyc, src):
            py_compile.compile(src, cfile=pyc, doraise=True)
        _prune_bytecode(cache, pyc)
    except Exception:       # read-only, odd permissions...: run as we are
        return
    flags = subprocess._args_from_interpreter_flags()
    os.execv(sys.executable, [sys.executable] + flags + [pyc, _SOURCE_ARG + src] + list(argv))


# ---------------------------------------------------------------------------
# 22. Appendix: the dashboard's page (HTML, CSS and JS, served as three files; a CSP
#     with no inline code). The dashboard section reads them from _DASHBOARD_FILES.
# ---------------------------------------------------------------------------


_DASHBOARD_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{{csrf}}">
<title>circus.py dashboard</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="dashboard.css">
</head>
<body>
<header>
  <h1>circus.py</h1>
  <span id="daemon" class="muted"></span>
  <span id="conn" class="conn down">connecting</span>
</header>
<main>
  <div id="result" role="status" aria-live="polite"></div>
  <table id="watchers">
    <thead><tr><th>watcher</th><th>state</th><th>processes · pid</th><th>CPU</th><th>memory</th>
      <th>restarts · uptime</th><th title="CPU (blue) and memory (orange), last minute">history</th><th>actions</th></tr></thead>
  </table>
  <p id="empty" class="muted" hidden>No watchers.</p>
  <section id="tailbox" hidden>
    <h2>output of <span id="tailname"></span> <button id="tailclose" type="button">close</button></h2>
    <pre id="tail"></pre>
  </section>
  <section>
    <h2>events</h2>
    <ol id="events"></ol>
  </section>
</main>
<footer class="muted">circus.py {{version}}: live over Server-Sent Events; actions are POST /api/COMMAND</footer>
<script src="dashboard.js"></script>
</body>
</html>
"""


_DASHBOARD_CSS = """
:root { --bg: #fff; --fg: #1d2330; --muted: #6b7280; --line: #e5e7eb; --row: #f8fafc;
  --ok: #15803d; --warn: #b45309; --bad: #b91c1c; --cpu: #2563eb; --mem: #ea580c; }
@media (prefers-color-scheme: dark) { :root { --bg: #111418; --fg: #e5e7eb; --muted: #9ca3af;
  --line: #2a2f37; --row: #171b21; --ok: #4ade80; --warn: #fbbf24; --bad: #f87171; } }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, sans-serif; background: var(--bg); color: var(--fg); }
header { display: flex; gap: 1em; align-items: baseline; padding: .6em 1em; border-bottom: 1px solid var(--line); }
h1 { font-size: 1.2em; margin: 0; } h2 { font-size: 1em; margin: 1.2em 0 .4em; }
main { padding: 0 1em 1em; } footer { padding: .5em 1em; font-size: .85em; }
.muted { color: var(--muted); }
.conn { margin-left: auto; font-size: .85em; } .conn.up { color: var(--ok); } .conn.down { color: var(--bad); }
#result { min-height: 1.6em; margin: .5em 0; font-family: ui-monospace, monospace; }
#result.ok { color: var(--ok); } #result.error { color: var(--bad); } #result.pending { color: var(--muted); }
table { border-collapse: collapse; width: 100%; }
th { text-align: left; font-weight: 600; color: var(--muted); border-bottom: 1px solid var(--line); padding: .3em .5em; }
td { padding: .25em .5em; border-bottom: 1px solid var(--line); vertical-align: middle; white-space: nowrap; }
tbody tr.watcher td { background: var(--row); font-weight: 600; }
tr.process td { font-size: .92em; } tr.process td:first-child { padding-left: 1.6em; font-weight: normal; }
.state { font-weight: 600; text-transform: lowercase; }
.state.active, .state.running, .state.done { color: var(--ok); }
.state.starting, .state.stopping, .state.backoff, .state.waiting { color: var(--warn); }
.state.stopped, .state.exited, .state.fatal, .state.flapping, .state.unhealthy { color: var(--bad); }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.error { color: var(--bad); font-weight: normal; white-space: normal; }
button, select { font: inherit; font-size: .85em; padding: .1em .5em; margin: 0 .1em; border: 1px solid var(--line);
  border-radius: 4px; background: var(--bg); color: var(--fg); cursor: pointer; }
button:hover { border-color: var(--cpu); } button:disabled { opacity: .5; cursor: wait; }
svg.spark { width: 120px; height: 24px; display: block; }
svg.spark polyline { fill: none; stroke-width: 1.5; }
svg.spark .cpu { stroke: var(--cpu); } svg.spark .mem { stroke: var(--mem); }
#tail { max-height: 24em; overflow: auto; background: var(--row); border: 1px solid var(--line);
  padding: .5em; margin: 0; white-space: pre-wrap; word-break: break-all; }
#tail .stderr { color: var(--bad); }
#events { list-style: none; padding: 0; margin: 0; font-family: ui-monospace, monospace; font-size: .85em;
  max-height: 16em; overflow: auto; }
#events li { padding: .1em 0; border-bottom: 1px dotted var(--line); }
"""


_DASHBOARD_JS = r"""
"use strict";
// Everything that comes from the daemon is put on the page as text (textContent), never as HTML.
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const table = document.getElementById("watchers");
const SIGNALS = ["HUP", "TERM", "INT", "QUIT", "USR1", "USR2", "KILL"];
const HISTORY = 60;
const watchers = new Map();     // name -> {body, cells, cpu: [], rss: [], procs: Map(pid -> row)}
let tail = null;                // the EventSource of the output being followed

function el(tag, props, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "text") e.textContent = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const kid of kids) e.append(kid);
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}
const percent = x => (x === null || x === undefined) ? "–" : x.toFixed(1) + " %";
function age(seconds) {
  if (!(seconds >= 0)) return "";
  const s = Math.floor(seconds), d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600),
        m = Math.floor(s % 3600 / 60);
  return d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m ? m + "m " + s % 60 + "s" : s + "s";
}
function setState(cell, text) {
  cell.textContent = text;
  cell.className = "state " + String(text).toLowerCase();
}

function show(text, kind) {
  const r = document.getElementById("result");
  r.textContent = text;
  r.className = kind;
}

async function act(command, props, label, button) {
  show(label + " …", "pending");
  if (button) button.disabled = true;
  try {
    const response = await fetch("api/" + command, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: JSON.stringify(props)});
    const reply = await response.json().catch(() => ({status: "error", reason: response.status + " " + response.statusText}));
    if (reply.status === "ok") {
      const n = reply.numprocesses !== undefined ? " (" + reply.numprocesses + " processes)" : "";
      show(label + ": ok" + n, "ok");
    } else {
      show(label + ": " + (reply.reason || "error"), "error");
    }
  } catch (e) {
    show(label + ": " + e, "error");
  } finally {
    if (button) button.disabled = false;
  }
}

function sparkline(values, cls, max) {
  const ns = "http://www.w3.org/2000/svg";
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("class", cls);
  const top = Math.max(max, 1e-9);
  const step = 120 / (HISTORY - 1), first = HISTORY - values.length;     // newest on the right
  line.setAttribute("points", values.map((v, i) =>
    ((first + i) * step).toFixed(1) + "," + (23 - 22 * (v || 0) / top).toFixed(1)).join(" "));
  return line;
}

function drawHistory(w) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 120 24");
  svg.append(sparkline(w.cpu, "cpu", Math.max(...w.cpu, 5)), sparkline(w.rss, "mem", 1.25 * Math.max(...w.rss)));
  const title = document.createElementNS(ns, "title");
  title.textContent = "CPU now " + percent(w.cpu[w.cpu.length - 1]) + ", memory now " + bytes(w.rss[w.rss.length - 1]);
  svg.append(title);
  w.cells.history.replaceChildren(svg);
}

function addWatcher(name) {
  const cells = {name: el("td", {text: name}), state: el("td", {class: "state"}), count: el("td", {class: "num"}),
                 cpu: el("td", {class: "num"}), rss: el("td", {class: "num"}), restarts: el("td", {class: "num"}),
                 history: el("td"), actions: el("td")};
  const signal = el("select", {"aria-label": "signal", dataset: {role: "signal"}},
                    ...SIGNALS.map(s => el("option", {value: s, text: s})));
  const button = (action, label, props, title) => el("button", {type: "button", text: label, title: title || action,
    dataset: {action: action}, onclick: ev => act(action, Object.assign({name: name}, props), action + " " + name, ev.target)});
  cells.actions.append(
    button("start", "start", {waiting: true}), button("stop", "stop", {waiting: true}),
    button("restart", "restart", {waiting: true}), button("reload", "reload", {waiting: true}),
    button("incr", "+1", {waiting: true}, "one more process"), button("decr", "−1", {waiting: true}, "one process less"),
    signal,
    el("button", {type: "button", text: "send", title: "send the signal to every process", dataset: {action: "signal"},
      onclick: ev => act("signal", {name: name, signum: signal.value}, "signal " + signal.value + " to " + name, ev.target)}),
    el("button", {type: "button", text: "tail", title: "follow the output", dataset: {action: "tail"},
      onclick: () => follow(name)}));
  const head = el("tr", {class: "watcher"}, cells.name, cells.state, cells.count, cells.cpu, cells.rss,
                  cells.restarts, cells.history, cells.actions);
  const error = el("td", {colspan: "8", class: "error"});
  const errorRow = el("tr", {class: "problem", hidden: ""}, error);
  const body = el("tbody", {dataset: {watcher: name}}, head, errorRow);
  table.append(body);
  const w = {body, cells, signal, error, errorRow, cpu: [], rss: [], procs: new Map()};
  watchers.set(name, w);
  return w;
}

function processRow(w, name, p) {
  const cells = {name: el("td"), state: el("td", {class: "state"}), pid: el("td", {class: "num pid"}),
                 cpu: el("td", {class: "num"}), rss: el("td", {class: "num"}), uptime: el("td", {class: "num"}),
                 actions: el("td")};
  cells.actions.append(el("button", {type: "button", text: "signal", title: "send the signal selected above to this process",
    dataset: {action: "signal-pid"},
    onclick: ev => act("signal", {name: name, pid: p.pid, signum: w.signal.value},
                       "signal " + w.signal.value + " to pid " + p.pid, ev.target)}));
  const row = el("tr", {class: "process", dataset: {pid: String(p.pid)}}, cells.name, cells.state, cells.pid,
                 cells.cpu, cells.rss, cells.uptime, el("td"), cells.actions);
  row.cells_ = cells;
  return row;
}

function render(snap) {
  const d = snap.daemon;
  document.getElementById("daemon").textContent =
    (d.pid ? "daemon pid " + d.pid + ", " + bytes(d.rss) + ", up " + age(snap.time - d.started) : "a circusd") +
    ", " + snap.watchers.length + " watchers";
  const seen = new Set();
  for (const s of snap.watchers) {
    seen.add(s.name);
    const w = watchers.get(s.name) || addWatcher(s.name);
    setState(w.cells.state, s.flapping ? "flapping" : s.status);
    const running = s.processes.filter(p => p.state !== "STOPPING").length;
    w.cells.count.textContent = running + " / " + s.numprocesses;
    w.cells.cpu.textContent = percent(s.cpu);
    w.cells.rss.textContent = bytes(s.rss);
    w.cells.restarts.textContent = s.restarts === null ? "–" : String(s.restarts);
    w.cpu.push(s.cpu || 0); w.rss.push(s.rss || 0);
    if (w.cpu.length > HISTORY) { w.cpu.shift(); w.rss.shift(); }
    drawHistory(w);
    w.error.textContent = s.last_error || "";
    w.errorRow.hidden = !s.last_error;
    const pids = new Set();
    let after = w.errorRow;
    for (const p of s.processes) {
      pids.add(p.pid);
      let row = w.procs.get(p.pid);
      if (!row) { row = processRow(w, s.name, p); w.procs.set(p.pid, row); }
      if (after.nextSibling !== row) after.after(row);
      after = row;
      const c = row.cells_;
      c.name.textContent = s.name + ":" + p.wid;
      setState(c.state, p.healthy === false ? "unhealthy" : p.state);     // failing its health check
      c.state.title = p.health || "";
      c.pid.textContent = "pid " + p.pid;
      c.cpu.textContent = percent(p.cpu);
      c.rss.textContent = bytes(p.rss);
      c.uptime.textContent = age(snap.time - p.started);
    }
    for (const [pid, row] of w.procs) if (!pids.has(pid)) { row.remove(); w.procs.delete(pid); }
  }
  for (const [name, w] of watchers) if (!seen.has(name)) { w.body.remove(); watchers.delete(name); }
  document.getElementById("empty").hidden = snap.watchers.length > 0;
}

function addEvent(e) {
  const list = document.getElementById("events");
  const time = new Date((e.payload.time || Date.now() / 1000) * 1000).toLocaleTimeString();
  const rest = Object.entries(e.payload).filter(([k]) => k !== "time").map(([k, v]) => k + "=" + JSON.stringify(v)).join(" ");
  list.prepend(el("li", {text: time + "  " + e.topic + "  " + rest}));
  while (list.children.length > 100) list.lastChild.remove();
}

function follow(name) {
  if (tail) tail.close();
  const box = document.getElementById("tailbox"), pre = document.getElementById("tail");
  document.getElementById("tailname").textContent = name;
  pre.replaceChildren();
  box.hidden = false;
  tail = new EventSource("tail?name=" + encodeURIComponent(name));
  tail.addEventListener("history", ev => {     // first, and again after a reconnection
    const h = JSON.parse(ev.data);
    pre.replaceChildren(h.data);
    if (h.note) pre.append(el("span", {class: "muted", text: h.note}));
    pre.scrollTop = pre.scrollHeight;
  });
  tail.addEventListener("output", ev => {
    const chunk = JSON.parse(ev.data);
    const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.append(chunk.stream === "stderr" ? el("span", {class: "stderr", text: chunk.data}) : chunk.data);
    while (pre.textContent.length > 65536 && pre.firstChild) pre.firstChild.remove();
    if (stick) pre.scrollTop = pre.scrollHeight;
  });
  tail.onerror = () => { if (tail.readyState === EventSource.CLOSED) show("tail " + name + ": not available", "error"); };
}

document.getElementById("tailclose").addEventListener("click", () => {
  if (tail) tail.close();
  tail = null;
  document.getElementById("tailbox").hidden = true;
});

function connect() {
  const conn = document.getElementById("conn");
  const events = new EventSource("events");
  events.addEventListener("snapshot", ev => { conn.textContent = "live"; conn.className = "conn up"; render(JSON.parse(ev.data)); });
  events.addEventListener("circus", ev => addEvent(JSON.parse(ev.data)));
  events.addEventListener("problem", ev => { conn.textContent = "daemon: " + JSON.parse(ev.data); conn.className = "conn down"; });
  events.onopen = () => { conn.textContent = "live"; conn.className = "conn up"; };
  events.onerror = () => { conn.textContent = "reconnecting"; conn.className = "conn down"; };
}
connect();
"""


_DASHBOARD_FILES.update({
    "/": ("text/html; charset=utf-8", _DASHBOARD_HTML),
    "/dashboard.css": ("text/css; charset=utf-8", _DASHBOARD_CSS),
    "/dashboard.js": ("text/javascript; charset=utf-8", _DASHBOARD_JS),
})


if __name__ == "__main__":
    _lean_restart(sys.argv[1:])
    # plugins, hooks and stream classes that `import circus` get this very module
    sys.modules.setdefault("circus", sys.modules[__name__])
    sys.exit(main())
