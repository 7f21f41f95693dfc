"""The Spark batch job's entry point: the script EMR Serverless (or any `spark-submit`) runs.

    spark-submit --master spark://host:7077 emr_entry.py '{"store": "s3://lake/prod", ...}'

Its one argument is the batch settings as a JSON object (the nightly function passes its
own: `lambdalake.functions.emr.job_request`), over the `LAMBDALAKE_*` environment. The run
joins the session spark-submit started (its master, jars and executors), publishes a new
version and prints its summary as one JSON line. A run refused or failed, or settings that
do not validate, exit 1 with one line on stderr: the job run fails and says why.

On EMR Serverless the driver needs `lambdalake[spark]` installed (a packed virtualenv in
`spark.archives`, see the README); this file is copied to S3 by the nightly function.
"""

from __future__ import annotations

import json
import sys

from pydantic import ValidationError

from lambdalake.batch.engine import SUBMITTED
from lambdalake.batch.run import BatchError, run_from_settings, summarize
from lambdalake.settings import Settings


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        settings = Settings(**json.loads(args[0])) if args else Settings()
        manifest = run_from_settings(settings, "spark", master=SUBMITTED)
    except (BatchError, ValueError) as exc:  # ValidationError and bad JSON are ValueErrors
        print(f"lambdalake batch job: {_one_line(exc)}", file=sys.stderr)
        return 1
    print(json.dumps(summarize(manifest)), flush=True)
    return 0


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        return f"settings: {'.'.join(map(str, error['loc']))}: {error['msg']}"
    return str(exc).splitlines()[0]


if __name__ == "__main__":
    sys.exit(main())
