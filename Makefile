# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test test-long test-reliability lint bench-speed bench-batch bench-serving bench-functions bench-kinesis clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.run-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

SCRIPTS := lambdalake/scripts
CACHE   := $(or $(LAMBDALAKE_CACHE),$(HOME)/.cache/lambdalake)
SAM_CLI := aws-sam-cli>=1.120,<2
APT     := apt-get -o DPkg::Lock::Timeout=600
SAM_VENV := $(CACHE)/venv-sam-$(shell echo '$(SAM_CLI)' | md5sum | cut -c1-8)

$(VENV)/.test-deps: pyproject.toml $(SCRIPTS)/kafka_fetch.sh $(SCRIPTS)/spark_jars.sh | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,kafka,spark,spark-connect]'
	bash $(SCRIPTS)/kafka_fetch.sh >/dev/null
	PYTHON=$(BIN)/python bash $(SCRIPTS)/spark_jars.sh >/dev/null
	# the dashboard test drives Debian's chromium; Playwright never downloads a browser.
	# Two clones installing at once wait for apt's lock rather than fail on it.
	test -x /usr/bin/chromium || ($(APT) update -q && $(APT) install -y -q chromium)
	command -v psql >/dev/null || { $(APT) update -qq && $(APT) install -y -qq postgresql-client >/dev/null; }
	# SAM CLI in a venv of its own (it pins a click that import-linter refuses), kept in the
	# cache beside Kafka's jars: every clone links the same one instead of a 75 s install
	mkdir -p $(CACHE) && flock $(SAM_VENV).lock sh -c "test -f $(SAM_VENV)/.installed || \
		{ rm -rf $(SAM_VENV) && $(PYTHON) -m venv $(SAM_VENV) \
		&& $(SAM_VENV)/bin/pip install -q '$(SAM_CLI)' && touch $(SAM_VENV)/.installed; }"
	ln -sfn $(SAM_VENV) .venv-sam
	touch $@

## run: the whole flow on the embedded default, with a synthetic producer
run: $(VENV)/.run-deps
	$(BIN)/lambdalake up --produce 50

## test: lint, then every suite against the real services it starts itself; the service tests
## run one at a time on one worker, the pure ones beside them (tests/conftest.py)
test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not long" -n 2

## test-long: the cases too long for `make test` (clusters, soak, large loads)
test-long: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider -m long

## test-reliability: tests/reliability, every case (kill -9, outages, load, hostile input) at
## full size, then the table of figures (tests/reliability/report.py)
test-reliability: $(VENV)/.test-deps
	rm -f build/reliability.jsonl
	LAMBDALAKE_RELIABILITY=full $(BIN)/python -m pytest -q -p no:cacheprovider -o timeout=1800 \
		tests/reliability tests/test_kafka_cluster.py
	$(BIN)/python tests/reliability/report.py

## secrets/api_keys.json: random ingest, query and admin keys for docker-compose.yml
secrets/api_keys.json:
	mkdir -p secrets
	$(PYTHON) -c 'import json, secrets; print(json.dumps([{"name": s, "scopes": [s], "key": secrets.token_urlsafe(32)} for s in ("ingest", "query", "admin")], indent=1))' > $@
	chmod 600 $@

## lint: ruff, the type check, and the import contracts, checked on the package as installed
## (the parts' folders install under lambdalake.*, which only an install lays out)
lint: $(VENV)/.test-deps
	$(BIN)/ruff check .
	$(BIN)/mypy
	rm -rf build/lint
	$(BIN)/pip install -q --no-deps --target build/lint .
	cd build/lint && ../../$(BIN)/lint-imports ../../pyproject.toml

bench-speed: $(VENV)/.test-deps
	$(BIN)/python bench/speed.py

bench-kinesis: $(VENV)/.test-deps
	$(BIN)/python bench/kinesis.py

bench-batch: $(VENV)/.test-deps
	$(BIN)/python bench/batch.py

bench-serving: $(VENV)/.test-deps
	$(BIN)/python bench/serving.py

bench-functions: $(VENV)/.test-deps
	$(BIN)/python bench/functions.py

clean:
	rm -rf $(VENV) .venv-sam .lambdalake
