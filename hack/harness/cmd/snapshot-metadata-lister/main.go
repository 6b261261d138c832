// Command snapshot-metadata-lister prints the allocated (or, with a previous snapshot,
// changed) block metadata of a VolumeSnapshot through the SnapshotMetadata gRPC service.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/kubernetes-csi/external-snapshot-metadata/pkg/iterator"

	"livedisk.io/harness/smtool"
)

func main() {
	var opts smtool.Options
	opts.Register(flag.CommandLine)
	var format string
	flag.StringVar(&format, "output-format", "table", "table or json")
	flag.StringVar(&format, "o", "table", "shorthand for -output-format")
	flag.Parse()

	var emitter iterator.IteratorEmitter
	switch format {
	case "table":
		emitter = &iterator.TableEmitter{Writer: os.Stdout}
	case "json":
		emitter = &iterator.JSONEmitter{Writer: os.Stdout}
	default:
		smtool.Fail(fmt.Errorf("unknown -output-format %q (table or json)", format))
	}
	if err := opts.Run(emitter); err != nil {
		smtool.Fail(err)
	}
}
