// Package smtool holds the flag handling shared by the snapshot-metadata-lister and
// snapshot-metadata-verifier commands. Both are thin front ends over the
// pkg/iterator library of github.com/kubernetes-csi/external-snapshot-metadata,
// whose own tools/ directories are separate, unpublished Go modules.
package smtool

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/kubernetes-csi/external-snapshot-metadata/pkg/iterator"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Options are the flags common to both commands.
type Options struct {
	Args       iterator.Args
	Kubeconfig string
	maxResults int
}

// Register adds the common flags (long and short names) to fs.
func (o *Options) Register(fs *flag.FlagSet) {
	str := func(p *string, long, short, usage string) {
		fs.StringVar(p, long, "", usage)
		fs.StringVar(p, short, "", "shorthand for -"+long)
	}
	str(&o.Args.Namespace, "namespace", "n", "namespace of the VolumeSnapshot objects")
	str(&o.Args.SnapshotName, "snapshot", "s", "VolumeSnapshot whose metadata is wanted")
	str(&o.Args.PrevSnapshotName, "previous-snapshot", "p", "earlier VolumeSnapshot (by name) for changed blocks")
	str(&o.Args.PrevSnapshotID, "previous-snapshot-id", "P", "CSI handle of an earlier snapshot for changed blocks")
	fs.StringVar(&o.Args.SAName, "service-account", "", "ServiceAccount used for the security token (default: the pod's)")
	fs.StringVar(&o.Args.SANamespace, "service-account-namespace", "", "namespace of -service-account")
	fs.Int64Var(&o.Args.TokenExpirySecs, "token-expiry", iterator.DefaultTokenExpirySeconds, "token lifetime in seconds")
	fs.Int64Var(&o.Args.StartingOffset, "starting-offset", 0, "starting byte offset")
	fs.IntVar(&o.maxResults, "max-results", 0, "maximum block entries per streamed record (0: server default)")
	def := os.Getenv("KUBECONFIG")
	if def == "" {
		if home, err := os.UserHomeDir(); err == nil {
			def = filepath.Join(home, ".kube", "config")
		}
	}
	fs.StringVar(&o.Kubeconfig, "kubeconfig", def, "kubeconfig path (empty or missing: in-cluster config)")
}

// Run builds the clients, then streams the metadata into the given emitter.
func (o *Options) Run(emitter iterator.IteratorEmitter) error {
	o.Args.MaxResults = int32(o.maxResults)
	var cfg *rest.Config
	var err error
	if _, statErr := os.Stat(o.Kubeconfig); o.Kubeconfig != "" && statErr == nil {
		cfg, err = clientcmd.BuildConfigFromFlags("", o.Kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return fmt.Errorf("loading kubeconfig %q: %w", o.Kubeconfig, err)
	}
	clients, err := iterator.BuildClients(cfg)
	if err != nil {
		return fmt.Errorf("creating clients: %w", err)
	}
	o.Args.Clients = clients
	o.Args.Emitter = emitter
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return iterator.GetSnapshotMetadata(ctx, o.Args)
}

// Fail prints err and exits 1.
func Fail(err error) {
	fmt.Fprintf(os.Stderr, "error: %v\n", err)
	os.Exit(1)
}
