"""`python -m ptqflow …`: the same command line as the `ptqflow` script."""

from ptqflow.pipelines.cli.app import app

if __name__ == "__main__":
    app(prog_name="ptqflow")
