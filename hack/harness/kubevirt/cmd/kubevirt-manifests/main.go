// Command kubevirt-manifests prints KubeVirt's and CDI's objects, as their operators make them,
// as one multi-document YAML stream on stdout:
//
//	kubevirt-manifests crds                       the CRDs of KubeVirt and CDI
//	kubevirt-manifests controller-rbac NAMESPACE  virt-controller's ServiceAccount, ClusterRole,
//	                                              Role and their bindings in NAMESPACE
//
// The CRDs of KubeVirt and CDI (Containerized Data Importer):
//   - KubeVirt's from the functions virt-operator itself calls
//     (kubevirt.io/kubevirt/pkg/virt-operator/resource/generate/components), in the order of
//     its install strategy, then the KubeVirt CRD (which virt-operator's deployment carries);
//   - CDI's from the YAML that cdi-operator installs (CDICRDs of
//     kubevirt.io/containerized-data-importer/pkg/operator/resources), sorted by name.
//
// virt-controller's RBAC is virt-operator's own (rbac.GetAllController of
// kubevirt.io/kubevirt/pkg/virt-operator/resource/generate/rbac, with the network-attachment
// rules, as virt-operator's default).
//
// The output is deterministic: status and metadata.creationTimestamp are dropped and keys are
// sorted (sigs.k8s.io/yaml).
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"sort"

	extv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"sigs.k8s.io/yaml"

	cdiresources "kubevirt.io/containerized-data-importer/pkg/operator/resources"
	"kubevirt.io/kubevirt/pkg/virt-operator/resource/generate/components"
	"kubevirt.io/kubevirt/pkg/virt-operator/resource/generate/rbac"
)

const usage = "usage: kubevirt-manifests crds | controller-rbac NAMESPACE"

func main() {
	out := bufio.NewWriter(os.Stdout)
	var err error
	switch {
	case len(os.Args) == 2 && os.Args[1] == "crds":
		err = crds(out)
	case len(os.Args) == 3 && os.Args[1] == "controller-rbac" && os.Args[2] != "":
		err = controllerRBAC(out, os.Args[2])
	default:
		fmt.Fprintln(os.Stderr, usage)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubevirt-crds:", err)
		os.Exit(1)
	}
	if err := out.Flush(); err != nil {
		fmt.Fprintln(os.Stderr, "kubevirt-crds:", err)
		os.Exit(1)
	}
}

func crds(out *bufio.Writer) error {
	kubevirt := []func() (*extv1.CustomResourceDefinition, error){
		// virt-operator's install strategy (pkg/virt-operator/resource/generate/install).
		components.NewVirtualMachineInstanceCrd, components.NewPresetCrd, components.NewReplicaSetCrd,
		components.NewVirtualMachineCrd, components.NewVirtualMachineInstanceMigrationCrd,
		components.NewVirtualMachineSnapshotCrd, components.NewVirtualMachineSnapshotContentCrd,
		components.NewVirtualMachineRestoreCrd, components.NewVirtualMachineInstancetypeCrd,
		components.NewVirtualMachineClusterInstancetypeCrd, components.NewVirtualMachinePoolCrd,
		components.NewMigrationPolicyCrd, components.NewVirtualMachinePreferenceCrd,
		components.NewVirtualMachineClusterPreferenceCrd, components.NewVirtualMachineExportCrd,
		components.NewVirtualMachineCloneCrd, components.NewVirtualMachineBackupCrd,
		components.NewVirtualMachineBackupTrackerCrd,
		// The KubeVirt CR's own CRD (shipped with virt-operator, not by it).
		components.NewKubeVirtCrd,
	}
	for _, newCRD := range kubevirt {
		crd, err := newCRD()
		if err != nil {
			return err
		}
		j, err := json.Marshal(crd)
		if err != nil {
			return err
		}
		if err := emit(out, j); err != nil {
			return err
		}
	}

	names := make([]string, 0, len(cdiresources.CDICRDs))
	for name := range cdiresources.CDICRDs {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		j, err := yaml.YAMLToJSON([]byte(cdiresources.CDICRDs[name]))
		if err != nil {
			return fmt.Errorf("CDI CRD %s: %w", name, err)
		}
		if err := emit(out, j); err != nil {
			return fmt.Errorf("CDI CRD %s: %w", name, err)
		}
	}
	return nil
}

func controllerRBAC(out *bufio.Writer, namespace string) error {
	for _, object := range rbac.GetAllController(namespace, true) {
		j, err := json.Marshal(object)
		if err != nil {
			return err
		}
		if err := emit(out, j); err != nil {
			return err
		}
	}
	return nil
}

// emit writes one object (as JSON) as a YAML document, without status and creationTimestamp.
func emit(out *bufio.Writer, j []byte) error {
	var m map[string]any
	if err := json.Unmarshal(j, &m); err != nil {
		return err
	}
	delete(m, "status")
	if meta, ok := m["metadata"].(map[string]any); ok {
		delete(meta, "creationTimestamp")
	}
	y, err := yaml.Marshal(m)
	if err != nil {
		return err
	}
	if _, err := fmt.Fprintf(out, "---\n%s", y); err != nil {
		return err
	}
	return nil
}
