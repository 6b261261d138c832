// Command etcd is the etcd v3.6 server, built from go.etcd.io/etcd/server/v3 at the
// version k8s.io/kubernetes v1.36.3 uses for its etcd client.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
