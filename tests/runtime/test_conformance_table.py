"""benchmarks/conformance_table.py, the README's conformance table: its markdown and the regression check CI
runs (a cell the README calls identical must be measured identical), on made-up measurements."""
import importlib.util
import pathlib

spec = importlib.util.spec_from_file_location("conformance_table", pathlib.Path(__file__).parents[2] / "benchmarks" /
                                              "conformance_table.py")
table_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table_module)


def _table(cell_of) -> dict:
    return {(name, form): {c: cell_of(name, form, c) for c in table_module.COLUMNS}
            for name in ("a", "b") for form in table_module.FORMS}


def test_the_table_names_what_differs_and_the_check_catches_a_regression():
    same = _table(lambda name, form, c: "identical" if c in table_module.SUPPORTED else "not installed")
    one_off = _table(lambda name, form, c: "step 3" if (name, form, c) == ("b", "defaults", "reference evaluator")
                     else "identical" if c in table_module.SUPPORTED else "not installed")
    text = table_module.markdown(one_off)
    assert "| defaults | identical | reference evaluator step 3 |" in text
    readme = f"intro\n{table_module.BEGIN}\n{text}\n{table_module.END}\nrest"
    assert table_module.regressions(readme, one_off) == []
    assert table_module.regressions(readme, same) == []                 # better than documented: no failure
    documented_same = f"{table_module.BEGIN}\n{table_module.markdown(same)}\n{table_module.END}"
    worse = table_module.regressions(documented_same, one_off)
    assert len(worse) == 1 and "defaults on b" in worse[0]
    assert table_module.regressions("no table", same) == ["no conformance table between its markers"]
