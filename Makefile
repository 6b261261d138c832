# The stable interface of the project. The scripts behind each target live in hack/.
.PHONY: up down test demo bench images generate fmt lint help

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

up: ## local cluster + CRDs + operator on loopback, ready for `kubectl apply -f examples/`
	hack/up.sh

down: ## stop everything `make up` started
	hack/down.sh

test: ## every test, on real parts (installs what it needs; starts and stops its own cluster)
	hack/test.sh

demo: ## a running VM's disks through livedisk on the local cluster (`make up` first when none answers)
	@{ [ -f .livedisk/env ] && . ./.livedisk/env && kubectl get nodes node-a node-b >/dev/null 2>&1; } || hack/up.sh
	hack/demo.sh

bench: ## the benchmarks (tables of ratios)
	hack/bench.sh

images: ## container images the chart names, built from Debian packages without a registry (OCI archives)
	hack/images.sh

generate: ## regenerate every generated file (CRD YAML)
	cargo run -q -p livedisk-api --bin crdgen

fmt: ## format the Rust code
	cargo fmt --all

lint: ## the static checks CI runs
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo run -q -p livedisk-api --bin crdgen -- --check
