"""
Poor man's configurator, after nanoGPT. Every script keeps its settings as plain module
globals in one block at the top, then calls

    configure(globals())

which applies, in order, each bare argument as a Python file of overrides and each
--key=value (or --key value) as one override:

    python train_vae.py config/shapes.py --batch_size=16 --out_dir=out-test

A value that looks like a Python literal (a number, a quoted string, a tuple or list,
True/False/None) is parsed with ast.literal_eval; anything else, of any length, is a
string. It must have the type of the default; a float must be finite, an int below 2^63,
and neither negative unless its default is (a sentinel such as sample.py's strength = -1).
A script declares the rest of what it accepts in its configure() call: the settings that
must be above zero (positive=), the values a setting may take (choices=) and the bounds of
a number (ranges=). An unknown key, a wrong type, a bad number or a value outside those
stops the script with a one-line message before any heavy work starts.

One config file serves every stage of a setup: it sees the name of the running script as
`script`, so settings that differ per stage sit under `if script == 'train_vae':`. It is
less clever than a config framework, and a reader sees every setting at the top of the
script that uses it: worth it.

What goes wrong is said the same way everywhere. The library raises UsageError (a missing
checkpoint, a full disk) and warns with UsageWarning (images skipped), so a program that
imports it can handle them; configure() makes the running script print each as one
`error:` or `warning:` line, while a bug keeps its traceback.
"""
import ast
import math
import os
import sys
import types
import warnings

SETTING_TYPES = (bool, int, float, str, tuple, list)
HERE = os.path.dirname(os.path.abspath(__file__))
_show_warning = warnings.showwarning


class UsageError(Exception):
    """A problem the person running IRIS can fix (a setting, a missing or unreadable file, a
    full disk), said in one line that names it and the fix. Library code raises it, so that a
    program importing IRIS can catch it; a script prints it as one `error:` line (configure)."""


class UsageWarning(UserWarning):
    """What the person running IRIS should know (images skipped, a prompt cut short): a
    script prints it as one `warning:` line, without the line of source Python adds."""


def _error_line(kind, error, traceback):
    if issubclass(kind, UsageError):
        print(f"error: {error}", file=sys.stderr)
    else:  # a bug: its traceback is what a developer needs
        sys.__excepthook__(kind, error, traceback)


def _warning_line(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, UsageWarning):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        _show_warning(message, category, filename, lineno, file, line)


def _settings(script_globals):
    # an upper-case name is a constant the script imported (flow.WEIGHTINGS), not a setting
    return {k: v for k, v in script_globals.items()
            if not k.startswith('_') and not k.isupper() and type(v) in SETTING_TYPES}


def _shown(value):
    return repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + '...'


def _checked(key, value, defaults, source, script):
    if key not in defaults:
        raise SystemExit(f"error: {script}.py has no setting '{key}' (from {source}); "
                         f"its settings are: {', '.join(sorted(defaults))}")
    default = defaults[key]
    if type(default) is float and type(value) is int:
        value = float(value)  # --lr=1 means 1.0
    if type(default) is tuple and type(value) is list:
        value = tuple(value)
    if type(value) is not type(default):
        raise SystemExit(f"error: setting '{key}' (from {source}) must be {type(default).__name__} "
                         f"like its default {default!r}, got {type(value).__name__} {_shown(value)}")
    if type(value) is tuple and default and any(type(x) is not type(default[0]) for x in value):
        raise SystemExit(f"error: setting '{key}' (from {source}) must hold {type(default[0]).__name__}s "
                         f"like its default {default!r}, got {value!r}"[:300])
    if type(value) in (int, float):
        in_range = abs(value) < 2 ** 63 if type(value) is int else math.isfinite(value)
        if not in_range or value < 0 <= default:
            kind = "an integer from 0 to below 2^63" if type(value) is int else "a finite number, not negative"
            raise SystemExit(f"error: setting '{key}' (from {source}) must be {kind}, got {value!r}")
    return value


def _parse(text):
    if not (text.lstrip().startswith(tuple('0123456789+-.([{\'"')) or text.strip() in ('True', 'False', 'None')):
        return text  # a bare word such as --out_dir=out-test, or a prompt, is a string
    try:
        return ast.literal_eval(text.strip())
    except (SyntaxError, ValueError, MemoryError, RecursionError):  # '-1 apples', '(' * 10000: a string too
        return text


def _check_declared(settings, positive, choices, ranges):
    for key in positive:
        value = settings[key]
        bad = (not value or min(value) < 1) if type(value) is tuple else value <= 0
        if bad:
            need = "a non-empty tuple of counts of at least 1" if type(value) is tuple else (
                "at least 1" if type(value) is int else "above 0")
            raise SystemExit(f"error: setting '{key}' must be {need}, got {value!r}")
    for key, allowed in choices.items():
        if settings[key] not in allowed:
            raise SystemExit(f"error: setting '{key}' must be one of {', '.join(map(repr, allowed))}, "
                             f"got {_shown(settings[key])}")
    for key, (low, high) in ranges.items():
        if not low <= settings[key] <= high:
            raise SystemExit(f"error: setting '{key}' must be from {low} to {high}, got {settings[key]!r}")


def _arguments(argv):
    """A command line -> ('file', path) for each config file and ('setting', key, text) for each
    --key=value or --key value, in order."""
    argv = list(argv)
    while argv:
        arg = argv.pop(0)
        if not arg.startswith('--'):
            yield 'file', arg
            continue
        key, sep, text = arg[2:].partition('=')
        if not sep:
            if not argv or argv[0].startswith('--'):
                raise SystemExit(f"error: '{arg}' has no value; write --{key}=VALUE")
            text = argv.pop(0)
        yield 'setting', key, text


def configure(script_globals, argv=None, positive=(), choices=None, ranges=None):
    """Apply config files and --key=value overrides to script_globals; return the settings dict.
    Once every override is in, checks positive: the settings that must be above zero (steps,
    sizes, batch, lr ...), choices: {setting: the values it may take} and ranges: {setting:
    (lowest, highest)}."""
    # from here on the script reports what its user can fix in one line, not a traceback
    sys.excepthook, warnings.showwarning = _error_line, _warning_line
    script = os.path.splitext(os.path.basename(script_globals.get('__file__', 'script')))[0]
    defaults = _settings(script_globals)
    for kind, *what in _arguments(sys.argv[1:] if argv is None else argv):
        if kind == 'setting':
            key, text = what
            script_globals[key] = _checked(key, _parse(text), defaults, f"--{key}", script)
        else:
            for key, value in read_config_file(what[0], script).items():
                script_globals[key] = _checked(key, value, defaults, what[0], script)
    _check_declared(script_globals, positive, choices or {}, ranges or {})
    return _settings(script_globals)


def config_files(argv=None):
    """The config files a command line names (its bare arguments), in order."""
    return [what[0] for kind, *what in _arguments(sys.argv[1:] if argv is None else argv) if kind == 'file']


def script_settings(script, paths):
    """Another script's settings as the config files `paths` set them for it, in order, over its
    own defaults (the literal values its settings block assigns before its configure() call,
    read without running it): how bench.py and check_gpu.py build the models a config trains."""
    with open(os.path.join(HERE, f'{script}.py')) as f:
        body = ast.parse(f.read()).body
    settings = {}
    for node in body:
        value = getattr(node, 'value', None)
        if isinstance(value, ast.Call) and getattr(value.func, 'id', '') == 'configure':  # the block ends there
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                settings[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:  # device = 'cuda' if ... : not a literal, and no model setting
                pass
    for path in paths:
        settings |= read_config_file(path, script)
    return settings


def read_config_file(path, script):
    """The settings a config file makes for `script` (a script's name, e.g. 'train_flow')."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise SystemExit(f"error: cannot read config file '{path}' ({e.strerror}); "
                         f"pass a path like config/shapes.py or --key=value")
    overrides = {'script': script}
    try:
        exec(compile(source, path, 'exec'), {}, overrides)
    except SyntaxError as e:
        raise SystemExit(f"error: config file '{path}' line {e.lineno}: {e.msg}") from None
    except Exception as e:  # a NameError, an import that fails...
        raise SystemExit(f"error: config file '{path}' stops with {type(e).__name__}: {e}") from None
    # a config file may import math or define a helper: those are not settings
    return {key: value for key, value in overrides.items() if key != 'script' and not key.startswith('_')
            and not isinstance(value, (types.ModuleType, types.FunctionType, type))}
