"""Run a module (pytest) in the guest with its imports served from one prebuilt file.

Under TCG every file operation on the guest's 9p root costs milliseconds, and
starting pytest with the suite's conftest imports about 280 modules at three or
four operations each.  The host (runner/stages/guest_bundle.py) marshals their
compiled code into one bundle; this bootstrap reads it with a single open and
serves those modules from memory.  Anything not in the bundle (a module imported
only while tests run, a test module pytest rewrites) imports the normal way, so
a bundle can make start-up slower or faster but never change what runs.

    python -S import_bundle.py BUNDLE SITE_DIR -m MODULE [ARG...]

-S skips site (its .pth files cost more 9p walks); SITE_DIR, the interpreter's
site-packages, goes on sys.path instead.  A bundle from another interpreter
(other bytecode magic) is ignored with a note on stderr.
"""

import importlib.machinery
import importlib.util
import marshal
import os
import runpy
import sys

FORMAT = 1


class BundleFinder:
    """A meta path finder and loader for the modules of one bundle."""

    def __init__(self, modules):
        self.modules = modules  # name -> (is_package, file name, marshalled code)

    def find_spec(self, name, path=None, target=None):
        entry = self.modules.get(name)
        if entry is None:
            return None
        is_package, filename, _ = entry
        spec = importlib.machinery.ModuleSpec(name, self, origin=filename, is_package=is_package)
        spec.has_location = True
        if is_package:
            # Submodules left out of the bundle are still found on disk.
            spec.submodule_search_locations = [os.path.dirname(filename)]
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        _, filename, code = self.modules[module.__spec__.name]
        module.__file__ = filename
        exec(marshal.loads(code), module.__dict__)  # noqa: S102 - the code of the module itself


def load(path):
    """The bundle's modules, or None (with a note) when this interpreter cannot use them."""
    with open(path, "rb") as bundle:
        content = marshal.loads(bundle.read())
    if content.get("format") != FORMAT or content.get("magic") != importlib.util.MAGIC_NUMBER:
        sys.stderr.write(f"import_bundle: {path} was made for another interpreter; "
                         "importing from disk\n")
        return None
    return content["modules"]


def main(argv):
    if len(argv) < 4 or argv[2] != "-m":
        sys.stderr.write("usage: python -S import_bundle.py BUNDLE SITE_DIR -m MODULE [ARG...]\n")
        return 2
    bundle, site_dir, module, args = argv[0], argv[1], argv[3], argv[4:]
    # `python -m` puts the working directory first, not this script's directory.
    sys.path[0] = os.getcwd()
    sys.path.append(site_dir)
    modules = load(bundle)
    if modules:
        sys.meta_path.insert(0, BundleFinder(modules))
    # As `python -m MODULE ARG...` would: the module's own name in argv[0].
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
