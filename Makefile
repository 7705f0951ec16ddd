# ckanext-webhooks: the two commands of the README, and a few more.
.PHONY: setup demo test bench clean

setup:            ## services, virtualenv and databases (idempotent)
	scripts/stack all

demo: setup       ## a CKAN with the extension, a worker and a receiver; shows a delivery
	scripts/demo

test: setup       ## the whole test suite
	scripts/test

bench: setup      ## the benchmarks in bench/ (JSON results in bench/results/)
	.venv/bin/python bench/run_all.py

clean:
	rm -rf .run test-artifacts bench/results
