"""Rule `study`: QUALITY.md and the SQNR-by-step plot over every variant of the study."""
from quantdiff.bench.study_report import write_study_report
from quantdiff.io import read_json
from quantdiff.stage import stage

with stage(snakemake) as log:
    records = [read_json(path) for path in snakemake.input.records]
    write_study_report(records, snakemake.output.markdown, snakemake.output.plot,
                       title=f"Quality study: {snakemake.wildcards.model}, 8-bit variants against fp16")
    log(f"wrote {snakemake.output.markdown} over {len(records)} variants")
