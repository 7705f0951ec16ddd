# ckanext-webhooks: the two commands of the README, and a few more.
.PHONY: setup demo test test-2.12 test-2.11 bench chaos soak clean i18n

setup:            ## services, virtualenv and databases (idempotent)
	scripts/stack all

demo: setup       ## a CKAN with the extension, a worker and a receiver; shows a delivery
	scripts/demo

test:             ## the whole test suite on CKAN 2.12 and 2.11, side by side (scripts/test-all)
	scripts/stack both
	scripts/test-all

test-2.12: setup  ## the suite on CKAN 2.12 only
	scripts/test

test-2.11:        ## the suite on CKAN 2.11 only
	CKAN_VERSION=2.11 scripts/stack all
	CKAN_VERSION=2.11 scripts/test

bench: setup      ## the benchmarks in bench/ (JSON results in bench/results/)
	scripts/stack bench-tools
	.venv/bin/python bench/run_all.py

chaos: setup      ## the fault tests alone (killed workers, restarts, hostile receivers)
	scripts/test -s ckanext/webhooks/tests/test_chaos.py ckanext/webhooks/tests/test_ownership.py

soak: setup       ## the soak test at full length: 30 min, 20 changes/s, 1,000 hooks
	WEBHOOKS_SOAK_SECONDS=1800 WEBHOOKS_SOAK_RATE=20 WEBHOOKS_SOAK_HOOKS=1000 \
	    scripts/test -s --timeout=0 ckanext/webhooks/tests/test_chaos.py -k soak

clean:
	rm -rf .run test-artifacts bench/results

i18n:             ## refresh the message catalogue template (ckanext/webhooks/i18n/*.pot)
	.venv/bin/pybabel extract -F babel.cfg --project ckanext-webhooks --no-location \
	    --omit-header -o ckanext/webhooks/i18n/ckanext-webhooks.pot ckanext/webhooks
