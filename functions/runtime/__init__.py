"""The local runtime: runs the template's functions here as AWS Lambda would run them."""
