"""Rule `summary`: one table of every bench in the config (Markdown, and HTML for the report)."""
from quantdiff.bench.report import summary_html, summary_markdown
from quantdiff.bench.schema import load_bench
from quantdiff.io import atomic_path
from quantdiff.stage import stage

with stage(snakemake) as log:
    records = [load_bench(path) for path in snakemake.input.benches]
    for path, text in ((snakemake.output.markdown, summary_markdown(records)), (snakemake.output.html, summary_html(records))):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    log(f"summarized {len(records)} benches")
