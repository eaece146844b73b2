"""pql.py and pql_threaded.py stand alone, yet share everything but the parallelism line for line."""
import ast
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What differs on purpose: the loop that runs the roles, and the set-up before it.
DIFFERENT_BY_DESIGN = {"train", "set_up_and_run"}


def top_level(path):
    source = open(path).read()
    tree = ast.parse(source)
    nodes = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            nodes[node.name] = node
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            nodes[node.targets[0].id] = node
    return source, nodes


def test_threaded_script_does_not_import_pql():
    tree = ast.parse(open(os.path.join(REPO, "pql_threaded.py")).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "pql" not in imported


def test_shared_functions_and_classes_are_identical():
    single_source, single = top_level(os.path.join(REPO, "pql.py"))
    threaded_source, threaded = top_level(os.path.join(REPO, "pql_threaded.py"))
    shared = set(single) - DIFFERENT_BY_DESIGN - {"Args"}
    assert shared <= set(threaded), f"missing from pql_threaded.py: {shared - set(threaded)}"
    assert len(shared) >= 15  # the normalizer, buffer, networks, updates, logging, ...
    for name in sorted(shared):
        assert (ast.get_source_segment(single_source, single[name])
                == ast.get_source_segment(threaded_source, threaded[name])), f"{name} differs between the scripts"


def test_threaded_args_extend_pql_args_field_for_field():
    """Every flag of pql.py exists in pql_threaded.py with the same type, default and docstring,
    in the same order; the threaded script only adds its placement flags at the end."""
    single_source, single = top_level(os.path.join(REPO, "pql.py"))
    threaded_source, threaded = top_level(os.path.join(REPO, "pql_threaded.py"))
    single_lines = ast.get_source_segment(single_source, single["Args"]).splitlines()
    threaded_lines = ast.get_source_segment(threaded_source, threaded["Args"]).splitlines()
    assert threaded_lines[:len(single_lines)] == single_lines
    added = "\n".join(threaded_lines[len(single_lines):])
    for flag in ["actor_device", "v_learner_device", "p_learner_device", "sync_interval"]:
        assert f"    {flag}:" in added


def test_diff_shows_only_the_parallel_parts():
    """The diff's changed blocks are the docstring, imports, the added flags and the parallel section."""
    diff = subprocess.run(["diff", os.path.join(REPO, "pql.py"), os.path.join(REPO, "pql_threaded.py")],
                          capture_output=True, text=True).stdout
    removed = [line[2:] for line in diff.splitlines() if line.startswith("< ")]
    # Of pql.py only its docstring, the loop section and the set-up may be replaced.
    single_source, single = top_level(os.path.join(REPO, "pql.py"))
    loop_start = single["train"].lineno
    docstring = single_source[:single_source.index('"""', 3) + 3]
    allowed = set(docstring.splitlines()) | set(single_source.splitlines()[loop_start - 3:])
    assert set(removed) <= allowed, set(removed) - allowed
