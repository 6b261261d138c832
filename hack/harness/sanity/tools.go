//go:build tools

// Package tools pins csi-sanity in this separate module. csi-test v5.6.0 is the first release
// that knows the CSI 1.12+ GET_SNAPSHOT controller capability livedisk advertises, and it needs
// CSI spec v1.13, which does not compile with k8s.io/kubernetes v1.36.3's pkg/volume/csi in the
// main harness module. csi-sanity shares no code with the cluster binaries, so nothing is lost.
package tools

import _ "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity"
