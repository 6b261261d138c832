// Command snapshot-metadata-verifier copies every block that the SnapshotMetadata service
// reports from a source device to a target device, then checks that both are identical.
// With a full snapshot's allocated blocks and an empty target, or a previous snapshot's
// copy as target and the changed blocks, a match proves the metadata complete.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/kubernetes-csi/external-snapshot-metadata/pkg/iterator"

	"livedisk.io/harness/smtool"
)

func main() {
	var opts smtool.Options
	opts.Register(flag.CommandLine)
	var src, dst string
	flag.StringVar(&src, "source-device-path", "", "device or file holding the snapshot's data (read)")
	flag.StringVar(&dst, "target-device-path", "", "device or file that receives the reported blocks (written)")
	flag.Parse()
	if src == "" || dst == "" {
		smtool.Fail(errors.New("-source-device-path and -target-device-path are required"))
	}
	s, err := os.Open(src)
	if err != nil {
		smtool.Fail(err)
	}
	defer s.Close()
	t, err := os.OpenFile(dst, os.O_RDWR, 0)
	if err != nil {
		smtool.Fail(err)
	}
	defer t.Close()
	if err := opts.Run(&iterator.VerifierEmitter{SourceDevice: s, TargetDevice: t}); err != nil {
		smtool.Fail(err)
	}
	fmt.Println("source and target contents match")
}
