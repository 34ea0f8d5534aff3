#!/usr/bin/env python3
"""The inputs of the committed browser simulator package (rollout-sim-web/pkg), one line each.

rollout-sim-web/pkg is committed so that a fresh machine need not compile wasm-bindgen-cli (minutes)
to build it. It stays valid while what it is compiled from is unchanged:

  - the Rust sources of fledge-rollout-sim-web, fledge-rollout-sim and fledge-core (whole-line comments,
    `#[cfg(test)] mod tests` blocks, test files `tests.rs` / `*_tests.rs` and `src/bin` left
    out: they do not change the package), their Cargo.toml files and rollout-sim-web/build.sh;
  - the locked versions (Cargo.lock) of every crate fledge-rollout-sim-web depends on, among them
    the pinned wasm-bindgen.

  python3 rollout-sim-web/inputs.py              print the manifest (name and SHA-256 per input)
  python3 rollout-sim-web/inputs.py --check      exit 1, naming the changed inputs, when
                                           rollout-sim-web/pkg/inputs.txt differs from it

rollout-sim-web/build.sh writes rollout-sim-web/pkg/inputs.txt next to the package it builds.
"""

import hashlib
import pathlib
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "rollout-sim-web" / "pkg" / "inputs.txt"
CRATES = ["rollout-sim-web", "rollout-sim", "core"]
ROOT_PACKAGE = "fledge-rollout-sim-web"


def significant_source(text: str) -> str:
    """The lines of a Rust file that reach the compiled package."""
    kept = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line == "#[cfg(test)]" and i + 1 < len(lines) and lines[i + 1].startswith("mod tests"):
            # rustfmt closes a top-level module with "}" at column 0.
            i += 2
            while i < len(lines) and lines[i] != "}":
                i += 1
            i += 1
            continue
        if not line.lstrip().startswith("//"):
            kept.append(line)
        i += 1
    return "\n".join(kept)


def source_inputs():
    files = [ROOT / "rollout-sim-web" / "build.sh"]
    for crate in CRATES:
        files.append(ROOT / crate / "Cargo.toml")
        files.extend(
            path
            for path in (ROOT / crate / "src").rglob("*.rs")
            if "bin" not in path.relative_to(ROOT / crate / "src").parts
            and path.name != "tests.rs"
            and not path.name.endswith("_tests.rs")
        )
    for path in sorted(files):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".rs":
            text = significant_source(text)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        yield f"{path.relative_to(ROOT).as_posix()} {digest}"


def locked_inputs():
    lock = tomllib.loads((ROOT / "Cargo.lock").read_text(encoding="utf-8"))
    packages = lock["package"]
    by_name = {}
    for package in packages:
        by_name.setdefault(package["name"], []).append(package)

    def resolve(dependency):
        # "name", "name version" or "name version (source)"
        name, *rest = dependency.split(" ")
        candidates = by_name.get(name, [])
        if rest:
            candidates = [p for p in candidates if p["version"] == rest[0]]
        return candidates

    seen = {}
    queue = list(by_name.get(ROOT_PACKAGE, []))
    while queue:
        package = queue.pop()
        key = (package["name"], package["version"])
        if key in seen:
            continue
        seen[key] = package
        for dependency in package.get("dependencies", []):
            queue.extend(resolve(dependency))
    for (name, version), package in sorted(seen.items()):
        if "source" in package:  # workspace crates are covered by their sources
            yield f"Cargo.lock {name} {version} {package.get('checksum', package['source'])}"


def manifest():
    return list(source_inputs()) + list(locked_inputs())


def main(argv):
    lines = manifest()
    if argv[1:] == ["--check"]:
        try:
            committed = MANIFEST.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            print(f"{MANIFEST.relative_to(ROOT)} is missing", file=sys.stderr)
            return 1
        if committed == lines:
            return 0
        changed = sorted(
            {line.rsplit(" ", 1)[0] for line in set(committed) ^ set(lines)}
        )
        print("changed inputs: " + ", ".join(changed), file=sys.stderr)
        return 1
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
