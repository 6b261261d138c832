// CoreDNS for the local cluster's nodes, built from the CoreDNS module with only the plugins the
// cluster's Corefile uses (hack/node/coredns.yaml): the full binary compiles every cloud
// provider's SDK and takes minutes longer on a cold build.
package main

import (
	_ "github.com/coredns/caddy/onevent"
	"github.com/coredns/coredns/coremain"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	coremain.Run()
}
